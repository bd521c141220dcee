"""Metric families for one scrape, built from what the scrape read.  Pure.

(About 500 lines: it holds every metric, the per-service and table-health
families included, built from the kernel's and
the leak scan's data, one function per group, so their names, labels and
HELP texts are read in one file.  The exporter's own bookkeeping metrics,
read errors and scrape timings, come from the collector that keeps them.)

:func:`build_families` takes a :class:`ScrapeInput` (the per-CPU aggregate,
the socket table, map fill levels, program run statistics and the leak
report, each ``None`` when its read failed) and returns fresh Prometheus
metric families plus how many label values it folded into ``other``.  No
I/O, no threads, no clocks, so histogram buckets, label capping and folding
are tested without a kernel (tests/unit/exporter/test_families.py).  The
reads happen in :mod:`pytracer.exporter.collector`, the HTTP side in
:mod:`pytracer.exporter.web`.

Kernel slots are log-linear over microseconds (pytracer/kernel/histogram.py);
the exported ``le`` bounds are powers of two in microseconds, which fall
exactly on slot boundaries, so no bucket is an estimate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from pytracer.kernel import abi
from pytracer.kernel.abi import Direction, Stat
from pytracer.kernel.histogram import Histogram, log2_bounds_seconds
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import KINDS
from pytracer.table.reads import live_states

NAMESPACE = "pytracer"
DEFAULT_MAX_COMMS = 20
DEFAULT_TIME_WAIT_TOP = 10
OTHER = "other"

# Powers of two in microseconds from 32 us to 2^36 us (19 h): exact slot
# boundaries of the kernel histogram (histogram.slot_upper_us(4p + 3) = 2^(p+2)).
BUCKETS_SECONDS: tuple[float, ...] = tuple(log2_bounds_seconds(1 << 5, 1 << 36))

CONNECTION_DIRECTIONS = (Direction.ACTIVE, Direction.PASSIVE)
# Closed sockets that were first seen mid-life have no direction.
CLOSED_DIRECTIONS = (Direction.ACTIVE, Direction.PASSIVE, Direction.UNKNOWN)

# States always exported by pytracer_sockets (zeros included, so a graph of
# a state that empties drops to zero instead of vanishing).  TIME_WAIT is
# not among them: the table never holds it, so it is exported only when the
# inventory counted it (a zero from the table would be a lie).
STABLE_STATES = tuple(s for s in TcpState if s <= TcpState.CLOSING and s != TcpState.TIME_WAIT)

# Which kernel counter counts failed inserts into which map.
INSERT_FAILURE_STATS = {"socks": Stat.INSERT_FAILED, "owners": Stat.FILTER_FULL, "listeners": Stat.LISTENER_FAILED}

# Kernel counters exported as pytracer_kernel_events_total{event}.
KERNEL_EVENTS = {
    "first_seen_midlife": Stat.MIDLIFE,
    "filter_skipped": Stat.FILTER_SKIPPED,
    "accept_untracked": Stat.ACCEPT_UNTRACKED,
    "app_close": Stat.APP_CLOSE,
    "destroyed": Stat.DESTROYED,
}


# --- options -------------------------------------------------------------------


@dataclass
class ExportOptions:
    pids: tuple[int, ...] = ()
    max_comms: int = DEFAULT_MAX_COMMS
    time_wait_top: int = DEFAULT_TIME_WAIT_TOP
    label_addresses: bool = False
    buckets_seconds: tuple[float, ...] = BUCKETS_SECONDS


# --- scrape input -> metric families --------------------------------------------


@dataclass
class ProgramStat:
    name: str
    run_time_ns: int
    run_cnt: int
    recursion_misses: int
    # Hits the kprobes core skipped before the program ran (a kprobe or
    # kretprobe program on v6.7+: Tracer.kprobe_misses); None otherwise.
    kprobe_misses: int | None = None


@dataclass
class MapStat:
    name: str
    entries: int | None  # None: the count could not be read
    capacity: int


@dataclass
class ScrapeInput:
    """Everything one scrape read.  ``None`` means that read failed."""

    totals: Any = None  # poller.Totals
    socks: np.ndarray | None = None  # reads.SOCK_DTYPE records
    table_states: np.ndarray | None = None  # reads.live_states of the table, when read by counts alone
    poll_seconds: float | None = None
    maps: list[MapStat] = field(default_factory=list)
    programs: list[ProgramStat] | None = None
    bpf_stats: bool = False
    leaks: Any = None  # pytracer.leaks.scanner.LeakReport
    services: list[Any] | None = None  # pytracer.table.services.ServiceStats
    hooks: list[tuple[str, str, str]] = field(default_factory=list)  # (hook, kind, program)
    build: dict[str, str] = field(default_factory=dict)
    table: Any = None  # pytracer.table.health.TableFill


def fold_top(
    values: Mapping[str, float], cap: int, combine: Callable[[Iterable[float]], float] = sum
) -> tuple[dict[str, float], int]:
    """Keep the ``cap`` largest label values; fold the rest into ``other``.

    Returns the kept values (plus ``other`` when anything was folded, its
    value ``combine`` of the folded ones) and how many values were folded.
    Ties are broken by name so the choice is stable between scrapes.
    A real label value that is literally ``other`` is folded too, so the
    result never has two meanings for one series.
    """
    ranked = sorted(((v, k) for k, v in values.items() if k != OTHER), key=lambda vk: (-vk[0], vk[1]))
    kept = {k: v for v, k in ranked[: max(cap, 0)]}
    rest = [v for v, _ in ranked[max(cap, 0):]]
    if OTHER in values:
        rest.append(values[OTHER])
    folded = len(rest)
    if rest:
        kept[OTHER] = combine(rest)
    return kept, folded


def histogram_buckets(h: Histogram, bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs at ``bounds`` (slot boundaries), then +Inf."""
    return [(floatToGoString(le), float(n)) for le, n in h.cumulative(bounds)]


def comm_of(raw: Any) -> str:
    if isinstance(raw, bytes):
        raw = raw.split(b"\0", 1)[0].decode(errors="replace")
    return str(raw) if raw else "unknown"


def build_families(inp: ScrapeInput, opts: ExportOptions) -> tuple[list[Metric], dict[str, int]]:
    """Metric families for one scrape, and label values folded per label."""
    ns = NAMESPACE
    out: list[Metric] = []
    folded: dict[str, int] = defaultdict(int)

    t = inp.totals
    if t is not None:
        life = HistogramMetricFamily(
            f"{ns}_connection_lifetime_seconds",
            "Lifetime of closed TCP connections, from the first SYN to CLOSE, by who opened them.",
            labels=["direction"],
        )
        for d in CONNECTION_DIRECTIONS:
            h = t.hist(abi.PT_HIST_LIFETIME + int(d))
            life.add_metric([d.name.lower()], histogram_buckets(h, opts.buckets_seconds), sum_value=h.sum_us / 1e6)
        out.append(life)

        dwell = HistogramMetricFamily(
            f"{ns}_state_duration_seconds",
            "Time a socket spent in a TCP state before leaving it (CLOSE, where a record ends, has none).",
            labels=["state"],
        )
        for s in range(abi.PT_STATES):
            h = t.hist(abi.PT_HIST_STATE + s)
            if h.count:
                dwell.add_metric(
                    [TcpState.name_of(s)], histogram_buckets(h, opts.buckets_seconds), sum_value=h.sum_us / 1e6
                )
        out.append(dwell)

        trans = CounterMetricFamily(
            f"{ns}_transitions", "TCP state transitions of tracked sockets.", labels=["from", "to"]
        )
        matrix = np.asarray(t.transitions)
        for old, new in zip(*np.nonzero(matrix)):
            trans.add_metric([TcpState.name_of(int(old)), TcpState.name_of(int(new))], float(matrix[old, new]))
        out.append(trans)

        opened = CounterMetricFamily(
            f"{ns}_connections_opened", "TCP connections opened (connect or accepted).", labels=["direction"]
        )
        for d in CONNECTION_DIRECTIONS:
            opened.add_metric([d.name.lower()], float(t.stat(Stat.OPENED, int(d))))
        out.append(opened)
        closed = CounterMetricFamily(
            f"{ns}_connections_closed",
            "TCP connections closed (reached CLOSE); direction unknown: sockets first seen mid-life.",
            labels=["direction"],
        )
        for d in CLOSED_DIRECTIONS:
            closed.add_metric([d.name.lower()], float(t.stat(Stat.CLOSED, int(d))))
        out.append(closed)

        events = CounterMetricFamily(
            f"{ns}_kernel_events", "Other counters kept by the BPF programs.", labels=["event"]
        )
        for name, st in KERNEL_EVENTS.items():
            events.add_metric([name], float(t.stat(st)))
        out.append(events)

    out.extend(_socket_families(inp, opts))
    if inp.services is not None:
        out.extend(_service_families(inp.services, opts))
    if inp.leaks is not None:
        out.extend(_leak_families(inp.leaks, opts, folded))
    out.extend(_tracer_families(inp))
    return out, dict(folded)


def _service_families(services: Iterable[Any], opts: ExportOptions) -> list[Metric]:
    """Per service (bounded: at most PT_SVC_SLOTS - 1 named, the rest in
    service="other"): lifetime, idle before end by ender, and ends."""
    ns = NAMESPACE
    life = HistogramMetricFamily(
        f"{ns}_service_connection_lifetime_seconds",
        "Lifetime of closed TCP connections by service: the listener's port (role=server) or the peer's port "
        "(role=client), named by --service-ports; the rest are service=\"other\".",
        labels=["service", "role"],
    )
    idle = HistogramMetricFamily(
        f"{ns}_connection_idle_before_end_seconds",
        "How long a TCP connection had carried no data when it ended, by service and by who ended it: "
        "local_close, peer_fin, reset_received, local_abort, timeout.",
        labels=["service", "role", "ender"],
    )
    ends = CounterMetricFamily(
        f"{ns}_service_connections_ended",
        "TCP connections ended, by service and by who ended them (never_established: no idle figure); "
        "service=\"other\" counts the ends folded there.  Every ender of a service that has ended a "
        "connection is present, zeros included, so increase() sees the first reset.",
        labels=["service", "role", "ender"],
    )
    for s in services:
        if not s.ends:
            continue
        for ender, h in s.idle.items():
            ends.add_metric([s.service, s.role, ender], float(h.count))
        ends.add_metric([s.service, s.role, "never_established"], float(s.no_idle))
        if s.lifetime.count:
            life.add_metric([s.service, s.role], histogram_buckets(s.lifetime, opts.buckets_seconds),
                            sum_value=s.lifetime.sum_us / 1e6)
        for ender, h in s.idle.items():
            if h.count:
                idle.add_metric([s.service, s.role, ender], histogram_buckets(h, opts.buckets_seconds),
                                sum_value=h.sum_us / 1e6)
    return [life, idle, ends]


def _socket_families(inp: ScrapeInput, opts: ExportOptions) -> list[Metric]:
    """pytracer_sockets{state}.

    Whole host: from the socket inventory (sock_diag over every namespace,
    what `ss` shows) when the leak layer provides it.  It includes the
    minisockets the kernel table never holds: TIME_WAIT, request sockets,
    and FIN_WAIT2 orphans, which tcp_time_wait() turns into timewait
    minisockets while the full socket goes FIN_WAIT2 -> CLOSE and is
    destroyed (net/ipv4/tcp.c, tcp_close(); net/ipv4/tcp_input.c).

    Under --pid (or without the inventory): from the kernel table, the
    sockets those processes own, seen since start or seeded at start.
    Minisockets have no owner, so they are not attributed to the pids;
    pytracer_time_wait_sockets covers TIME_WAIT in their namespaces.
    """
    inv = getattr(inp.leaks, "inventory_states", None) if inp.leaks is not None else None
    counts: dict[str, float] = {}
    if inv and not opts.pids:
        for name, n in inv.items():
            counts[str(name)] = float(n)
        for s in STABLE_STATES:
            counts.setdefault(s.name, 0.0)
        counts.setdefault("TIME_WAIT", 0.0)
    elif inp.table_states is not None or inp.socks is not None:
        by_state = inp.table_states if inp.table_states is not None else live_states(inp.socks)
        for s in range(len(by_state)):
            if by_state[s] or s in STABLE_STATES:
                counts[TcpState.name_of(s)] = float(by_state[s])
    else:
        return []
    fam = GaugeMetricFamily(
        f"{NAMESPACE}_sockets",
        "Live TCP sockets by state.  Whole host: every namespace's sockets as sock_diag (ss) lists them, "
        "minisockets included; with --pid: the sockets those processes own (no TIME_WAIT).",
        labels=["state"],
    )
    for name in sorted(counts):
        fam.add_metric([name], counts[name])
    return [fam]


def _leak_families(report: Any, opts: ExportOptions, folded: dict[str, int]) -> list[Metric]:
    ns = NAMESPACE
    out: list[Metric] = []
    flags = list(getattr(report, "flags", None) or [])

    by_kind_comm: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    # Every kind the detectors know, so its gauge exists (as 0) before its first flag.
    oldest: dict[str, float] = {k: 0.0 for k in KINDS}
    for f in flags:
        kind = str(getattr(f, "kind", "unknown"))
        by_kind_comm[kind][comm_of(getattr(f, "comm", None))] += 1
        secs = getattr(f, "seconds", None)
        oldest[kind] = max(oldest.get(kind, 0.0), float(secs or 0.0))
    flagged = GaugeMetricFamily(
        f"{ns}_flagged_sockets", "Sockets (or processes) the leak detectors flag, by kind and command.",
        labels=["kind", "comm"],
    )
    for kind in sorted(by_kind_comm):
        kept, n = fold_top(by_kind_comm[kind], opts.max_comms)
        folded["comm"] += n
        for comm in sorted(kept):
            flagged.add_metric([kind, comm], kept[comm])
    out.append(flagged)
    old = GaugeMetricFamily(
        f"{ns}_flagged_oldest_seconds", "Seconds the oldest flagged condition of each kind has lasted (0: none).",
        labels=["kind"],
    )
    for kind in sorted(oldest):
        old.add_metric([kind], oldest[kind])
    out.append(old)

    resets = [f for f in flags if getattr(f, "kind", None) == "idle_reset"]
    t_fam = GaugeMetricFamily(
        f"{ns}_idle_reset_seconds",
        "Idle time T after which a service's connections are reset (or closed by the peer), from the "
        "idle_reset rule; absent when none is flagged.",
        labels=["service", "role"],
    )
    hit_fam = GaugeMetricFamily(
        f"{ns}_idle_reset_connections",
        "Connections of a flagged service that ended by a RST (or the peer's FIN) at idle T.",
        labels=["service", "role"],
    )
    for f in resets:
        key = [str(f.extra.get("service")), str(f.extra.get("role"))]
        t_fam.add_metric(key, float(f.extra.get("t_seconds") or 0.0))
        hit_fam.add_metric(key, float(f.extra.get("hits") or 0))
    out += [t_fam, hit_fam]

    raw_tw = getattr(report, "time_wait", None)
    if raw_tw is not None:
        tw = list(raw_tw)
        tw.sort(key=lambda e: (-int(e[1]), str(e[0])))
        top, rest = tw[: opts.time_wait_top], tw[opts.time_wait_top:]
        socks_fam = GaugeMetricFamily(
            f"{ns}_time_wait_sockets",
            "TIME_WAIT sockets towards the busiest destinations (top N; the rest summed as 'other'). "
            "The destination is addr:port with --label-addresses, otherwise its rank (top1 is the busiest).",
            labels=["destination"],
        )
        ratio_fam = GaugeMetricFamily(
            f"{ns}_time_wait_port_usage_ratio",
            "TIME_WAIT sockets to a destination over the size of the ephemeral port range "
            "(1: connect() to it starts failing with EADDRNOTAVAIL).",
            labels=["destination"],
        )
        for i, (dest, count, range_size) in enumerate(top):
            label = str(dest) if opts.label_addresses else f"top{i + 1}"
            socks_fam.add_metric([label], float(count))
            ratio_fam.add_metric([label], float(count) / float(range_size) if range_size else 0.0)
        if rest:
            socks_fam.add_metric([OTHER], float(sum(int(e[1]) for e in rest)))
            folded["destination"] += len(rest)
        out += [socks_fam, ratio_fam]

    procs = getattr(report, "processes", None)
    if procs is not None:
        ratio: dict[str, float] = {}
        close_wait: dict[str, float] = defaultdict(float)
        for _pid, p in dict(procs).items():
            comm = comm_of(getattr(p, "comm", None))
            open_fds, max_fds = getattr(p, "open_fds", None), getattr(p, "max_fds", None)
            if open_fds is not None and max_fds:
                ratio[comm] = max(ratio.get(comm, 0.0), float(open_fds) / float(max_fds))
            # CLOSE_WAIT sockets it holds an fd for, plus unaccepted ones in
            # its listeners' queues: both are its leak.
            close_wait[comm] += float(getattr(p, "close_wait", 0) or 0) + float(
                getattr(p, "close_wait_backlog", 0) or 0
            )
        kept, n = fold_top(ratio, opts.max_comms, combine=max)
        folded["comm"] += n
        fd_fam = GaugeMetricFamily(
            f"{ns}_process_fd_usage_ratio",
            "Open fds over RLIMIT_NOFILE, the highest among the processes with this command.",
            labels=["comm"],
        )
        for comm in sorted(kept):
            fd_fam.add_metric([comm], kept[comm])
        kept, n = fold_top(close_wait, opts.max_comms)
        folded["comm"] += n
        cw_fam = GaugeMetricFamily(
            f"{ns}_close_wait_sockets",
            "CLOSE_WAIT sockets held by processes with this command (by an fd, or unaccepted in their listeners).",
            labels=["comm"],
        )
        for comm in sorted(kept):
            cw_fam.add_metric([comm], kept[comm])
        out += [fd_fam, cw_fam]
    return out


def _tracer_families(inp: ScrapeInput) -> list[Metric]:
    ns = NAMESPACE
    out: list[Metric] = []
    if inp.maps:
        entries = GaugeMetricFamily(f"{ns}_map_entries", "Entries in a BPF hash map.", labels=["map"])
        cap = GaugeMetricFamily(f"{ns}_map_capacity_entries", "max_entries of a BPF hash map.", labels=["map"])
        for m in inp.maps:
            if m.entries is not None:
                entries.add_metric([m.name], float(m.entries))
            cap.add_metric([m.name], float(m.capacity))
        out += [entries, cap]

    t = inp.totals
    misses = kprobe_missed = None
    if inp.programs is not None:
        misses = sum(p.recursion_misses for p in inp.programs)
        known = [p.kprobe_misses for p in inp.programs if p.kprobe_misses is not None]
        kprobe_missed = sum(known) if known else None
    if t is not None:
        fails = CounterMetricFamily(
            f"{ns}_map_insert_failures", "Failed inserts into a BPF map (full, or out of memory).", labels=["map"]
        )
        for name, st in INSERT_FAILURE_STATS.items():
            fails.add_metric([name], float(t.stat(st)))
        out.append(fails)
    if inp.table is not None:
        full = GaugeMetricFamily(
            f"{ns}_socket_table_full",
            "1 while the socket table is full or refused an insert in the last 10 s or more (since the previous "
            "scrape at least): the socket and state figures then miss the sockets it could not track.",
        )
        full.add_metric([], float(inp.table.full))
        out.append(full)
    if t is not None or misses is not None:
        lost = CounterMetricFamily(
            f"{ns}_lost_events",
            "Events the tracer could not record: socket table full (insert_failed), owner filter full, "
            "a program not run because another BPF program was running on that CPU (recursion_miss), "
            "or a kprobe hit the kprobes core skipped (kprobe_miss; kprobe programs on Linux 6.7+).",
            labels=["reason"],
        )
        if t is not None:
            lost.add_metric(["insert_failed"], float(t.stat(Stat.INSERT_FAILED)))
            lost.add_metric(["owner_filter_full"], float(t.stat(Stat.FILTER_FULL)))
        if misses is not None:
            lost.add_metric(["recursion_miss"], float(misses))
        if kprobe_missed is not None:
            lost.add_metric(["kprobe_miss"], float(kprobe_missed))
        out.append(lost)

    if inp.programs is not None:
        rec = CounterMetricFamily(
            f"{ns}_bpf_program_recursion_misses", "Times the kernel skipped a program (recursion).",
            labels=["program"],
        )
        for p in inp.programs:
            rec.add_metric([p.name], float(p.recursion_misses))
        out.append(rec)
        if kprobe_missed is not None:
            kp = CounterMetricFamily(
                f"{ns}_bpf_program_kprobe_misses",
                "Times the kprobes core skipped a kprobe program's hit (another kprobe's handler was running "
                "on that CPU, or a kretprobe had no free instance).",
                labels=["program"],
            )
            for p in inp.programs:
                if p.kprobe_misses is not None:
                    kp.add_metric([p.name], float(p.kprobe_misses))
            out.append(kp)
        if inp.bpf_stats or any(p.run_cnt for p in inp.programs):
            run_s = CounterMetricFamily(
                f"{ns}_bpf_program_run_seconds",
                "Time spent in each BPF program (counted while kernel.bpf_stats_enabled=1).",
                labels=["program"],
            )
            runs = CounterMetricFamily(
                f"{ns}_bpf_program_runs", "Runs of each BPF program (counted while bpf stats are on).",
                labels=["program"],
            )
            for p in inp.programs:
                run_s.add_metric([p.name], p.run_time_ns / 1e9)
                runs.add_metric([p.name], float(p.run_cnt))
            out += [run_s, runs]

    if inp.poll_seconds is not None:
        poll = GaugeMetricFamily(f"{ns}_poll_duration_seconds", "Time the last read of the kernel maps took.")
        poll.add_metric([], inp.poll_seconds)
        out.append(poll)

    if inp.build:
        keys = ["version", "backend", "kernel"]
        info = GaugeMetricFamily(f"{ns}_build_info", "pytracer version, backend and kernel; always 1.", labels=keys)
        info.add_metric([inp.build.get(k, "") for k in keys], 1.0)
        out.append(info)
    if inp.hooks:
        hooks = GaugeMetricFamily(
            f"{ns}_hook_info", "Which program (and attach kind) each kernel hook got; always 1.",
            labels=["hook", "kind", "program"],
        )
        for hook, kind, prog in inp.hooks:
            hooks.add_metric([hook, kind, prog], 1.0)
        out.append(hooks)
    return out

