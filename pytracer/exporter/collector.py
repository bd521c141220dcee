"""Prometheus exporter: a Collector that reads the kernel maps at scrape time,
and the small HTTP(S) server that serves it.

Nothing here keeps a second copy of the kernel's truth.  Every scrape reads
the per-CPU aggregate and the socket table (:mod:`pytracer.table.poll`), asks the
leak detectors (:mod:`pytracer.leaks.scanner`, when present) for their findings, and
builds fresh metric families from those reads.  The only state held in
Python is the exporter's own bookkeeping: how often a read failed and how
many label values were folded into ``other``.

The layers, so the logic can be tested without a kernel:

* :func:`build_families` is pure: a :class:`ScrapeInput` in, metric
  families out.  Histogram buckets, label capping and folding happen here.
* :class:`TracerCollector` does the I/O for one scrape: it reads the maps,
  the programs' run statistics and the leak report, each in its own
  ``try`` so that one failed read is logged and counted
  (``pytracer_read_errors_total{what}``) and never fails the scrape.
* :func:`make_server` binds the listening socket (TLS and basic auth from
  an exporter-toolkit web-config file, see :func:`load_web_config`).

Kernel slots are log-linear over microseconds (pytracer/histogram.py); the
exported ``le`` bounds are powers of two in microseconds, which fall exactly
on slot boundaries, so no bucket is an estimate.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import gzip
import hashlib
import hmac
import ipaddress
import logging
import os
import platform
import socket
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from pytracer import __version__
from pytracer.kernel import abi
from pytracer.kernel.abi import Direction, Stat
from pytracer.kernel.histogram import Histogram, log2_bounds_seconds
from pytracer.kernel.tcp_states import TcpState

log = logging.getLogger("pytracer.exporter.collector")

NAMESPACE = "pytracer"
DEFAULT_LISTEN = "127.0.0.1:9808"
DEFAULT_MAX_COMMS = 20
DEFAULT_TIME_WAIT_TOP = 10
DEFAULT_LEAK_INTERVAL = 15.0
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

# Hash maps whose fill level is worth watching; missing ones are skipped.
WATCHED_MAPS = ("socks", "owners", "listeners")
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

# Flag kinds of the leak detectors, so the "oldest" gauge exists (as 0)
# before the first flag of a kind; pytracer.leaks.detectors.KINDS when present.
KNOWN_FLAG_KINDS = ("close_wait", "idle_established", "fin_wait2_orphan", "fd_exhaustion", "time_wait_pressure")


def flag_kinds() -> tuple[str, ...]:
    try:
        from pytracer.leaks.detectors import KINDS  # noqa: PLC0415 - optional layer
    except ImportError:
        return KNOWN_FLAG_KINDS
    return tuple(KINDS)

# Reads a scrape makes; their error counters exist from the start at 0.
READS = ("agg", "socks", "maps", "programs", "leaks")


class ExportError(RuntimeError):
    """The exporter cannot start as asked; the message is one line."""


# --- options -------------------------------------------------------------------


@dataclass
class ExportOptions:
    pids: tuple[int, ...] = ()
    max_comms: int = DEFAULT_MAX_COMMS
    time_wait_top: int = DEFAULT_TIME_WAIT_TOP
    label_addresses: bool = False
    buckets_seconds: tuple[float, ...] = BUCKETS_SECONDS


# --- pure layer: scrape input -> metric families -------------------------------


@dataclass
class ProgramStat:
    name: str
    run_time_ns: int
    run_cnt: int
    recursion_misses: int


@dataclass
class MapStat:
    name: str
    entries: int | None  # None: the count could not be read
    capacity: int


@dataclass
class ScrapeInput:
    """Everything one scrape read.  ``None`` means that read failed."""

    totals: Any = None  # poller.Totals
    socks: np.ndarray | None = None  # poller.SOCK_DTYPE records
    poll_seconds: float | None = None
    maps: list[MapStat] = field(default_factory=list)
    programs: list[ProgramStat] | None = None
    bpf_stats: bool = False
    leaks: Any = None  # pytracer.leaks.scanner.LeakReport
    hooks: list[tuple[str, str, str]] = field(default_factory=list)  # (hook, kind, program)
    build: dict[str, str] = field(default_factory=dict)


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
            "Lifetime of closed TCP connections, from the first SYN to destroy, by who opened them.",
            labels=["direction"],
        )
        for d in CONNECTION_DIRECTIONS:
            h = t.hist(abi.PT_HIST_LIFETIME + int(d))
            life.add_metric([d.name.lower()], histogram_buckets(h, opts.buckets_seconds), sum_value=h.sum_us / 1e6)
        out.append(life)

        dwell = HistogramMetricFamily(
            f"{ns}_state_duration_seconds",
            "Time a socket spent in a TCP state before leaving it (or being destroyed in it).",
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
            "TCP connections destroyed; direction unknown: sockets first seen mid-life.",
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
    if inp.leaks is not None:
        out.extend(_leak_families(inp.leaks, opts, folded))
    out.extend(_tracer_families(inp))
    return out, dict(folded)


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
    elif inp.socks is not None:
        socks = inp.socks
        # Records that count: the kernel counted them, or they were seeded
        # from the inventory at start (seeded records stay out of the
        # histograms, their birth being unknown, but they are live sockets).
        # Left out: other processes' passive sockets under --pid, kept only
        # until accept() names their owner.
        live = (socks["counted"] != 0) | ((socks["flags"] & abi.PT_F_SEEDED) != 0)
        by_state = np.bincount(socks["state"][live].astype(np.intp), minlength=abi.PT_STATES)
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
    oldest: dict[str, float] = {k: 0.0 for k in flag_kinds()}
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
    misses = None
    if inp.programs is not None:
        misses = sum(p.recursion_misses for p in inp.programs)
    if t is not None:
        fails = CounterMetricFamily(
            f"{ns}_map_insert_failures", "Failed inserts into a BPF map (full, or out of memory).", labels=["map"]
        )
        for name, st in INSERT_FAILURE_STATS.items():
            fails.add_metric([name], float(t.stat(st)))
        out.append(fails)
    if t is not None or misses is not None:
        lost = CounterMetricFamily(
            f"{ns}_lost_events",
            "Events the tracer could not record: socket table full (insert_failed), owner filter full, "
            "or a program not run because another BPF program was running on that CPU (recursion_miss).",
            labels=["reason"],
        )
        if t is not None:
            lost.add_metric(["insert_failed"], float(t.stat(Stat.INSERT_FAILED)))
            lost.add_metric(["owner_filter_full"], float(t.stat(Stat.FILTER_FULL)))
        if misses is not None:
            lost.add_metric(["recursion_miss"], float(misses))
        out.append(lost)

    if inp.programs is not None:
        rec = CounterMetricFamily(
            f"{ns}_bpf_program_recursion_misses", "Times the kernel skipped a program (recursion).",
            labels=["program"],
        )
        for p in inp.programs:
            rec.add_metric([p.name], float(p.recursion_misses))
        out.append(rec)
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


# --- the collector: I/O for one scrape -----------------------------------------


def bpf_stats_enabled(path: str = "/proc/sys/kernel/bpf_stats_enabled") -> bool:
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class BpfStats:
    """Kernel BPF run-time statistics held on for as long as this is open.

    BPF_ENABLE_STATS (v5.8) returns an fd; the kernel counts run time and
    runs of every program while any such fd is open, without touching the
    kernel.bpf_stats_enabled sysctl other tools may own.
    """

    BPF_STATS_RUN_TIME = 0

    def __init__(self) -> None:
        from pytracer.kernel import libbpf

        lib = libbpf.library()
        fn = lib.bpf_enable_stats
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        rc = fn(self.BPF_STATS_RUN_TIME)
        if rc < 0:
            err = -rc if rc != -1 else (ctypes.get_errno() or errno.EPERM)
            raise ExportError(f"cannot turn on BPF run-time statistics: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
        self.fd: int | None = rc

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BpfStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TracerCollector(Collector):
    """Reads the tracer's maps at scrape time and yields fresh metric families.

    ``tracer`` is a loaded :class:`pytracer.kernel.core.Tracer` (or any backend
    with ``map()``, ``ncpus``, ``programs()``, ``choices`` and ``backend``).
    ``scanner`` is ``"auto"`` to use :mod:`pytracer.leaks.scanner` when it imports,
    ``None`` to skip leak metrics, or an object with ``scan(snapshot)``.

    The kernel maps are read during every scrape.  The leak scan (sock_diag
    over every namespace, /proc, tcp_info) costs far more on a busy host
    (seconds at 100,000 sockets), so after :meth:`start` it runs in a thread
    of its own every ``leak_interval`` seconds (stretched to four times its
    own duration, so it never takes more than a quarter of a CPU), and a
    scrape uses its latest report; ``pytracer_leak_scan_age_seconds`` says
    how old that is.  Without :meth:`start` (or with ``leak_interval=0``)
    each scrape scans.
    """

    def __init__(
        self,
        tracer: Any,
        opts: ExportOptions | None = None,
        scanner: Any = "auto",
        thresholds: Mapping[str, Any] | None = None,
        bpf_stats: bool = False,
        leak_interval: float = DEFAULT_LEAK_INTERVAL,
    ) -> None:
        self.tracer = tracer
        self.leak_interval = leak_interval
        # Held around every read of the tracer's maps (scrape and scan thread)
        # so close() can wait for them before the tracer frees its maps.
        self._maps_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report: Any = None
        self._report_mono = 0.0
        self.leak_scans = 0
        self.leak_scan_seconds: float | None = None
        self.opts = opts or ExportOptions()
        self.thresholds = dict(thresholds or {})
        self.bpf_stats_held = bpf_stats
        self._scanner = scanner
        self._scanner_ready = scanner != "auto"
        self._lock = threading.Lock()
        self._closed = False
        self.read_errors: dict[str, int] = {w: 0 for w in READS}
        # Scrapes read the socket table into the same arrays every time (as
        # `tracer watch` does): fresh ones cost a page fault per 4 KiB the
        # kernel writes, ~0.1 s of a ~0.5 s scrape at 1M sockets.  Only
        # collect() reads into them, one scrape at a time (self._lock); the
        # scan thread reads its own.
        self._sock_buffers: Any = None
        self.label_overflow: dict[str, int] = {"comm": 0, "destination": 0}
        self.scrapes = 0
        self.last_scrape_seconds: float | None = None
        self._last_logged: dict[str, float] = {}

    def describe(self) -> list[Metric]:
        # Registering must not scrape the kernel.
        return []

    def start(self) -> None:
        """Run leak scans in the background (see the class docstring)."""
        if self.leak_interval <= 0 or self._thread is not None or self._scanner_obj() is None:
            return
        self._thread = threading.Thread(target=self._scan_loop, name="pytracer-leak-scan", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse further reads; waits for a scrape or scan in flight (the
        tracer is about to be closed and its map fds with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        got = self._maps_lock.acquire(timeout=timeout)
        self._closed = True
        if got:
            self._maps_lock.release()

    def _scan_loop(self) -> None:
        from pytracer.table import poll as poller

        scanner = self._scanner
        # Ends with close(); each round waits at least 50 ms.
        while not self._stop.is_set():
            t0 = time.monotonic()
            snap = None
            with self._maps_lock:
                if self._closed:
                    return
                try:
                    snap = poller.snapshot(self.tracer)
                except Exception as exc:  # noqa: BLE001
                    self._failed("leaks", exc)
            if snap is not None:
                self._scan_once(scanner, snap, t0)
            spent = time.monotonic() - t0
            period = max(self.leak_interval, 4 * spent)
            self._stop.wait(max(period - spent, 0.05))

    def _scan_once(self, scanner: Any, snap: Any, t0: float) -> Any:
        try:
            rep = scanner.scan(snap)
        except Exception as exc:  # noqa: BLE001 - a broken layer must not stop the exporter
            self._failed("leaks", exc)
            return None
        errors = list(getattr(rep, "errors", None) or [])
        if errors:
            self._failed("leaks", RuntimeError("; ".join(errors[:3])))
        self._report = rep
        self._report_mono = time.monotonic()
        self.leak_scan_seconds = self._report_mono - t0
        self.leak_scans += 1
        return rep

    # -- error accounting --

    def _failed(self, what: str, exc: BaseException) -> None:
        self.read_errors[what] = self.read_errors.get(what, 0) + 1
        now = time.monotonic()
        if now - self._last_logged.get(what, -1e9) >= 60.0:
            self._last_logged[what] = now
            log.warning("reading %s failed (counted in %s_read_errors_total): %s", what, NAMESPACE, exc)

    # -- reads --

    def _scanner_obj(self) -> Any:
        if self._scanner_ready:
            return self._scanner
        self._scanner_ready = True
        self._scanner = None
        try:
            from pytracer.leaks.scanner import Scanner, Thresholds  # noqa: PLC0415 - optional layer
        except ImportError as exc:
            self._failed("leaks", exc)
            return None
        try:
            self._scanner = Scanner(self.tracer, Thresholds(**self.thresholds), pids=self.opts.pids)
        except Exception as exc:  # noqa: BLE001 - a broken layer must not stop the exporter
            self._failed("leaks", exc)
        return self._scanner

    def _maps(self) -> list[MapStat]:
        out = []
        for name in WATCHED_MAPS:
            try:
                m = self.tracer.map(name)
                capacity = m.max_entries
            except Exception:  # noqa: BLE001 - this backend or version has no such map
                continue
            out.append(MapStat(name, None, capacity))
        return out

    def _programs(self) -> list[ProgramStat]:
        out = []
        for p in self.tracer.programs():
            info = p.info()
            out.append(ProgramStat(p.name, int(info.run_time_ns), int(info.run_cnt), int(info.recursion_misses)))
        return out

    def read(self) -> ScrapeInput:
        """One scrape's reads.  Never raises: failures are counted."""
        from pytracer.table import poll as poller

        inp = ScrapeInput()
        if self._closed:
            return inp
        t0 = time.perf_counter()
        totals = socks = keys = None
        try:
            totals = poller.read_totals(self.tracer)
        except Exception as exc:  # noqa: BLE001
            self._failed("agg", exc)
        try:
            if self._sock_buffers is None:
                self._sock_buffers = poller.SockBuffers()
            keys, socks = poller.read_socks(self.tracer, self._sock_buffers)
        except Exception as exc:  # noqa: BLE001
            self._failed("socks", exc)
        mono = time.monotonic_ns()
        inp.totals, inp.socks = totals, socks
        inp.poll_seconds = time.perf_counter() - t0

        try:
            inp.maps = self._maps()
            for m in inp.maps:
                if m.name == "socks":
                    m.entries = len(socks) if socks is not None else None
                else:
                    m.entries = self.tracer.map(m.name).dump(self.tracer.map(m.name).value_size)[2]
        except Exception as exc:  # noqa: BLE001
            self._failed("maps", exc)
        try:
            inp.programs = self._programs()
        except Exception as exc:  # noqa: BLE001
            self._failed("programs", exc)
        inp.bpf_stats = self.bpf_stats_held or bpf_stats_enabled()

        scanner = self._scanner_obj()
        if self._thread is not None:
            inp.leaks = self._report
        elif scanner is not None and totals is not None and socks is not None:
            snap = poller.Snapshot(mono, time.time(), totals, keys, socks, inp.poll_seconds)
            inp.leaks = self._scan_once(scanner, snap, time.monotonic())

        inp.build = {
            "version": __version__,
            "backend": str(getattr(self.tracer, "backend", "unknown")),
            "kernel": platform.release(),
        }
        for hook, ch in sorted(getattr(self.tracer, "choices", {}).items()):
            if not ch.kind:
                inp.hooks.append((hook, "none", ""))
            for prog in ch.programs:
                inp.hooks.append((hook, ch.kind, prog))
        return inp

    def collect(self) -> list[Metric]:
        with self._lock:
            t0 = time.perf_counter()
            fams: list[Metric] = []
            if not self._closed:
                try:
                    with self._maps_lock:
                        inp = self.read()
                    fams, folded = build_families(inp, self.opts)
                    for label, n in folded.items():
                        self.label_overflow[label] = self.label_overflow.get(label, 0) + n
                except Exception as exc:  # noqa: BLE001 - a scrape never raises
                    self._failed("collect", exc)
                    fams = []
            self.scrapes += 1
            fams += self._self_families(time.perf_counter() - t0)
            return fams

    def _self_families(self, seconds: float) -> list[Metric]:
        ns = NAMESPACE
        errs = CounterMetricFamily(
            f"{ns}_read_errors", "Failed reads (map, programs, leak detectors); each is logged.", labels=["what"]
        )
        for what in sorted(self.read_errors):
            errs.add_metric([what], float(self.read_errors[what]))
        over = CounterMetricFamily(
            f"{ns}_label_overflow",
            "Label values folded into 'other' because of the cardinality cap (--max-comms, --time-wait-top).",
            labels=["label"],
        )
        for label in sorted(self.label_overflow):
            over.add_metric([label], float(self.label_overflow[label]))
        dur = GaugeMetricFamily(f"{ns}_scrape_duration_seconds", "Time this scrape took to read and build.")
        dur.add_metric([], seconds)
        self.last_scrape_seconds = seconds
        out = [errs, over, dur]
        if self._scanner not in (None, "auto"):
            scans = CounterMetricFamily(f"{ns}_leak_scans", "Leak detector scans completed.")
            scans.add_metric([], float(self.leak_scans))
            reaped = CounterMetricFamily(
                f"{ns}_records_reaped",
                "Table records deleted because their socket no longer existed and no destroy event was seen "
                "(each is logged); their lifetimes are not in the histograms.",
            )
            reaped.add_metric([], float(getattr(self._scanner, "reaped", 0)))
            out += [scans, reaped]
        if self.leak_scan_seconds is not None:
            sd = GaugeMetricFamily(f"{ns}_leak_scan_duration_seconds", "Time the last leak scan took.")
            sd.add_metric([], self.leak_scan_seconds)
            age = GaugeMetricFamily(
                f"{ns}_leak_scan_age_seconds", "Age of the leak report the leak metrics come from."
            )
            age.add_metric([], time.monotonic() - self._report_mono)
            out += [sd, age]
        return out


# --- web config (exporter-toolkit format) --------------------------------------

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {
    "cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version",
    "cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans",
}
_UNSUPPORTED_TLS = {
    "cipher_suites": "Go cipher suite names have no OpenSSL equivalent here",
    "curve_preferences": "not supported",
    "client_allowed_sans": "not supported",
}


@dataclass
class WebConfig:
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    client_auth: ssl.VerifyMode = ssl.CERT_NONE
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


def parse_web_config(doc: Any, base_dir: str = ".") -> WebConfig:
    """Validate a parsed web-config document.  Relative paths are relative to
    the config file's directory, as in the exporter toolkit."""
    if doc is None:
        return WebConfig()
    if not isinstance(doc, dict):
        raise ExportError("web config: expected a mapping at the top level")
    unknown = set(doc) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise ExportError(f"web config: unknown key(s) {', '.join(sorted(unknown))}")
    wc = WebConfig()

    def path(v: Any, what: str) -> str:
        if not isinstance(v, str) or not v:
            raise ExportError(f"web config: tls_server_config.{what} must be a file path")
        p = v if os.path.isabs(v) else os.path.join(base_dir, v)
        if not os.path.isfile(p):
            raise ExportError(f"web config: tls_server_config.{what}: no such file {p}")
        return p

    tls = doc.get("tls_server_config")
    if tls:
        if not isinstance(tls, dict):
            raise ExportError("web config: tls_server_config must be a mapping")
        unknown = set(tls) - _TLS_KEYS
        if unknown:
            raise ExportError(f"web config: unknown tls_server_config key(s) {', '.join(sorted(unknown))}")
        for key, why in _UNSUPPORTED_TLS.items():
            if tls.get(key):
                raise ExportError(f"web config: tls_server_config.{key} is not supported by pytracer ({why})")
        if not tls.get("cert_file") or not tls.get("key_file"):
            raise ExportError("web config: tls_server_config needs both cert_file and key_file")
        wc.cert_file = path(tls["cert_file"], "cert_file")
        wc.key_file = path(tls["key_file"], "key_file")
        auth = tls.get("client_auth_type") or "NoClientCert"
        if auth not in _CLIENT_AUTH:
            raise ExportError(
                f"web config: client_auth_type {auth!r} is not supported (use one of {', '.join(_CLIENT_AUTH)})"
            )
        wc.client_auth = _CLIENT_AUTH[auth]
        if tls.get("client_ca_file"):
            wc.client_ca_file = path(tls["client_ca_file"], "client_ca_file")
        elif wc.client_auth != ssl.CERT_NONE:
            raise ExportError(f"web config: client_auth_type {auth} needs client_ca_file")
        for key in ("min_version", "max_version"):
            v = tls.get(key)
            if v is None:
                continue
            if v not in _TLS_VERSIONS:
                raise ExportError(f"web config: {key} {v!r}: use one of {', '.join(_TLS_VERSIONS)}")
            setattr(wc, key, _TLS_VERSIONS[v])

    users = doc.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise ExportError("web config: basic_auth_users must map user names to bcrypt hashes")
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ExportError(f"web config: basic_auth_users.{user}: expected a bcrypt hash ($2y$...)")
        if ":" in str(user):
            raise ExportError(f"web config: basic_auth_users: user name {user!r} contains ':'")
        wc.users[str(user)] = hashed.encode()
    if wc.users:
        try:
            import bcrypt  # noqa: F401, PLC0415
        except ImportError:
            raise ExportError("web config: basic_auth_users needs the bcrypt package (pip install bcrypt)") from None

    http = doc.get("http_server_config") or {}
    if not isinstance(http, dict):
        raise ExportError("web config: http_server_config must be a mapping")
    unknown = set(http) - {"headers", "http2"}
    if unknown:
        raise ExportError(f"web config: unknown http_server_config key(s) {', '.join(sorted(unknown))}")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise ExportError("web config: http_server_config.headers must be a mapping")
    wc.headers = {str(k): str(v) for k, v in headers.items()}
    return wc


def load_web_config(path: str) -> WebConfig:
    import yaml  # noqa: PLC0415 - only needed with --web-config

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ExportError(f"web config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ExportError(f"web config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_web_config(doc, os.path.dirname(os.path.abspath(path)))


def tls_context(wc: WebConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = wc.min_version
    if wc.max_version is not None:
        ctx.maximum_version = wc.max_version
    try:
        ctx.load_cert_chain(wc.cert_file, wc.key_file)  # type: ignore[arg-type]
        if wc.client_ca_file:
            ctx.load_verify_locations(cafile=wc.client_ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ExportError(f"web config: cannot load TLS certificate/key: {exc}") from None
    ctx.verify_mode = wc.client_auth
    return ctx


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes.

    bcrypt is slow on purpose (tens of ms), and Prometheus sends the same
    credentials every scrape, so successful checks are cached by a keyed
    hash of the credentials (as the exporter toolkit does).  Unknown users
    still cost one bcrypt check, so timing does not reveal user names.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = dict(users)
        self._key = os.urandom(32)
        self._ok: dict[bytes, bool] = {}
        self._lock = threading.Lock()
        if not self.users:
            return
        import bcrypt  # noqa: PLC0415 - only with basic_auth_users

        self._bcrypt = bcrypt
        self._dummy = bcrypt.hashpw(b"pytracer-dummy", bcrypt.gensalt(rounds=10))

    def check(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        user, sep, password = raw.partition(":")
        if not sep:
            return False
        token = hmac.new(self._key, raw.encode(), hashlib.sha256).digest()
        with self._lock:
            if token in self._ok:
                return True
        hashed = self.users.get(user)
        try:
            ok = self._bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if len(self._ok) >= 64:
                    self._ok.clear()
                self._ok[token] = True
        return ok


# --- HTTP server -----------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``.  An empty host means every interface."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ExportError(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise ExportError(f"--listen {listen!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ExportError(f"--listen {listen!r}: port out of range")
    return host, p


LANDING = b"""<html><head><title>pytracer exporter</title></head><body>
<h1>pytracer exporter</h1><p><a href="/metrics">Metrics</a></p></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    server_version = f"pytracer/{__version__}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, ctype: str, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**self.server.web.headers, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        srv = self.server
        if not srv.auth.check(self.headers.get("Authorization")):
            challenge = {"WWW-Authenticate": 'Basic realm="pytracer"'}
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", challenge)
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            body = encoder(srv.registry)
            extra = {}
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                body = gzip.compress(body, compresslevel=1)
                extra["Content-Encoding"] = "gzip"
            self._send(200, body, ctype, extra)
        elif path == "/":
            self._send(200, LANDING, "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET


class ExporterServer(ThreadingHTTPServer):
    """A threading HTTP(S) server for one registry.

    TLS handshakes run in the connection's own thread (not in the accept
    loop), and every connection has a timeout, so a slow or silent client
    cannot stall other scrapes.
    """

    daemon_threads = True
    request_queue_size = 64
    allow_reuse_address = True
    timeout_seconds = 30.0

    def __init__(self, host: str, port: int, web: WebConfig, registry: CollectorRegistry) -> None:
        fam = socket.AF_INET
        if host:
            try:
                fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            except ValueError:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                fam, host = infos[0][0], infos[0][4][0]
        self.address_family = fam
        self.web = web
        self.registry = registry
        self.ssl_context = tls_context(web) if web.tls else None
        self.auth = BasicAuth(web.users)
        super().__init__((host or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}/metrics"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(self.timeout_seconds)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error serving %s", client_address, exc_info=True)


def make_server(listen: str, web: WebConfig | None, registry: CollectorRegistry) -> ExporterServer:
    """Bind (but do not serve yet).  A busy port is one clear ExportError."""
    host, port = parse_listen(listen)
    try:
        return ExporterServer(host, port, web or WebConfig(), registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ExportError(f"cannot listen on {listen}: address already in use") from None
        raise ExportError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


def make_registry() -> CollectorRegistry:
    """A registry with the standard process_* metrics of this process; the
    tracer's collector is registered once the programs are loaded."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    return registry
