"""The exporter's pure layer: kernel aggregates in, metric families out.

Inputs are built the way the kernel lays them out (per-CPU pt_agg bytes,
pt_sock records), and expectations come from the raw durations and records
the test made, not from the exporter's own helpers.
"""

from __future__ import annotations

import ctypes
import random
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pytracer.exporter import families
from pytracer.exporter.families import ExportOptions, ScrapeInput, build_families, fold_top
from pytracer.kernel import abi
from pytracer.kernel.histogram import slot_of
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import KINDS
from pytracer.table.poll import Totals
from pytracer.table.reads import SOCK_DTYPE


def make_totals(per_cpu: list[abi.PtAgg]) -> Totals:
    stride = abi.percpu_stride(ctypes.sizeof(abi.PtAgg))
    raw = b"".join(bytes(a).ljust(stride, b"\0") for a in per_cpu)
    return Totals.from_percpu(raw, len(per_cpu))


def observe(agg: abi.PtAgg, hist: int, us: int) -> None:
    agg.hists[hist].slots[slot_of(us)] += 1
    agg.hists[hist].sum_us += us


class Registry:
    """Collects a list of families through a real registry and parses the text back."""

    def __init__(self, fams: list) -> None:
        class _C:
            def collect(self_inner):  # noqa: N805
                return fams

            def describe(self_inner):  # noqa: N805
                return []

        reg = CollectorRegistry(auto_describe=False)
        reg.register(_C())
        self.text = generate_latest(reg).decode()
        self.samples: dict[tuple[str, tuple], float] = {}
        for fam in text_string_to_metric_families(self.text):
            for s in fam.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str) -> dict[tuple, float]:
        return {lab: v for (n, lab), v in self.samples.items() if n == name}


def render(inp: ScrapeInput, opts: ExportOptions | None = None) -> tuple[Registry, dict[str, int]]:
    fams, folded = build_families(inp, opts or ExportOptions())
    return Registry(fams), folded


def test_lifetime_buckets_match_the_durations_exactly() -> None:
    rng = random.Random(11)
    cpus = [abi.PtAgg(), abi.PtAgg()]
    durations = {abi.Direction.ACTIVE: [], abi.Direction.PASSIVE: []}
    for _ in range(4000):
        d = rng.choice(list(durations))
        us = int(10 ** rng.uniform(0.5, 10.5))  # 3 us .. ~9 h
        durations[d].append(us)
        observe(rng.choice(cpus), abi.PT_HIST_LIFETIME + int(d), us)
    reg, _ = render(ScrapeInput(totals=make_totals(cpus)))
    for d, values in durations.items():
        name = d.name.lower()
        assert reg.get("pytracer_connection_lifetime_seconds_count", direction=name) == len(values)
        assert reg.get("pytracer_connection_lifetime_seconds_sum", direction=name) == pytest.approx(sum(values) / 1e6)
        series = reg.series("pytracer_connection_lifetime_seconds_bucket")
        buckets = {float(dict(lab)["le"]): v for lab, v in series.items() if dict(lab)["direction"] == name}
        assert buckets[float("inf")] == len(values)
        assert len(buckets) == len(families.BUCKETS_SECONDS) + 1
        for le in families.BUCKETS_SECONDS:
            # The kernel truncates to whole microseconds; a bucket bound is a
            # power of two in us, and a slot's upper bound is exclusive.
            expected = sum(1 for us in values if us < round(le * 1e6))
            assert buckets[le] == expected, le


def test_bucket_bounds_are_powers_of_two_microseconds() -> None:
    for le in families.BUCKETS_SECONDS:
        us = round(le * 1e6)
        assert us & (us - 1) == 0 and abs(us - le * 1e6) < 1e-6


def test_state_duration_only_for_states_seen_and_named_by_kernel_name() -> None:
    agg = abi.PtAgg()
    observe(agg, abi.PT_HIST_STATE + int(TcpState.CLOSE_WAIT), 2_500_000)
    observe(agg, abi.PT_HIST_STATE + int(TcpState.ESTABLISHED), 100)
    observe(agg, abi.PT_HIST_STATE + int(TcpState.ESTABLISHED), 300)
    reg, _ = render(ScrapeInput(totals=make_totals([agg])))
    counts = {dict(lab)["state"]: v for lab, v in reg.series("pytracer_state_duration_seconds_count").items()}
    assert counts == {"CLOSE_WAIT": 1, "ESTABLISHED": 2}
    assert reg.get("pytracer_state_duration_seconds_bucket", state="CLOSE_WAIT", le="2.097152") == 0
    assert reg.get("pytracer_state_duration_seconds_bucket", state="CLOSE_WAIT", le="4.194304") == 1


def test_counters_transitions_opened_closed() -> None:
    a, b = abi.PtAgg(), abi.PtAgg()
    a.transitions[int(TcpState.ESTABLISHED)][int(TcpState.CLOSE_WAIT)] = 3
    b.transitions[int(TcpState.ESTABLISHED)][int(TcpState.CLOSE_WAIT)] = 4
    b.transitions[int(TcpState.SYN_SENT)][int(TcpState.ESTABLISHED)] = 9
    a.stats[abi.Stat.OPENED + abi.Direction.ACTIVE] = 5
    b.stats[abi.Stat.OPENED + abi.Direction.PASSIVE] = 6
    b.stats[abi.Stat.CLOSED + abi.Direction.UNKNOWN] = 2
    a.stats[abi.Stat.INSERT_FAILED] = 1
    b.stats[abi.Stat.INSERT_FAILED] = 2
    reg, _ = render(ScrapeInput(totals=make_totals([a, b])))
    assert reg.series("pytracer_transitions_total") == {
        (("from", "ESTABLISHED"), ("to", "CLOSE_WAIT")): 7,
        (("from", "SYN_SENT"), ("to", "ESTABLISHED")): 9,
    }
    assert reg.get("pytracer_connections_opened_total", direction="active") == 5
    assert reg.get("pytracer_connections_opened_total", direction="passive") == 6
    assert reg.get("pytracer_connections_closed_total", direction="unknown") == 2
    assert reg.get("pytracer_lost_events_total", reason="insert_failed") == 3
    assert reg.get("pytracer_map_insert_failures_total", map="socks") == 3


def sock_table(rows: list[tuple[int, int]], flags: int = 0) -> np.ndarray:
    """(state, counted) rows as pt_sock records."""
    socks = np.zeros(len(rows), dtype=SOCK_DTYPE)
    for i, (state, counted) in enumerate(rows):
        socks[i]["state"] = state
        socks[i]["counted"] = counted
        socks[i]["flags"] = flags
    return socks


def test_sockets_by_state_from_the_table_under_pid_and_the_inventory_host_wide() -> None:
    rows = [(int(TcpState.ESTABLISHED), 1)] * 5 + [(int(TcpState.CLOSE_WAIT), 1)] * 2
    rows += [(int(TcpState.ESTABLISHED), 0)] * 3  # not ours (--pid): not counted
    seeded = sock_table([(int(TcpState.LISTEN), 0)] * 4, flags=abi.PT_F_SEEDED | abi.PT_F_BIRTH_UNKNOWN)
    table = np.concatenate([sock_table(rows), seeded])
    report = SimpleNamespace(inventory_states={"TIME_WAIT": 42, "ESTABLISHED": 999, "FIN_WAIT2": 3})

    # --pid: the table (counted or seeded records); ownerless TIME_WAIT absent.
    reg, _ = render(ScrapeInput(socks=table, leaks=report), ExportOptions(pids=(1,)))
    got = {dict(lab)["state"]: v for lab, v in reg.series("pytracer_sockets").items()}
    assert got["ESTABLISHED"] == 5
    assert got["CLOSE_WAIT"] == 2
    assert got["LISTEN"] == 4  # seeded at start: live, though uncounted in histograms
    assert got["SYN_SENT"] == 0  # stable series for every real state...
    assert "TIME_WAIT" not in got  # ...but never a false zero for what the table cannot hold
    assert set(got) == {s.name for s in TcpState if s <= TcpState.CLOSING} - {"TIME_WAIT"}

    # Whole host: the inventory, which is what ss lists (minisockets included).
    reg, _ = render(ScrapeInput(socks=table, leaks=report))
    got = {dict(lab)["state"]: v for lab, v in reg.series("pytracer_sockets").items()}
    assert got["ESTABLISHED"] == 999 and got["TIME_WAIT"] == 42 and got["FIN_WAIT2"] == 3
    assert got["LISTEN"] == 0

    # No inventory (leak layer absent): the table, host-wide too.
    reg, _ = render(ScrapeInput(socks=table))
    assert reg.get("pytracer_sockets", state="ESTABLISHED") == 5
    assert reg.get("pytracer_sockets", state="TIME_WAIT") is None


def test_fold_top_caps_and_counts() -> None:
    kept, n = fold_top({"a": 5, "b": 9, "c": 1, "d": 1}, 2)
    assert kept == {"b": 9, "a": 5, "other": 2} and n == 2
    kept, n = fold_top({"a": 0.5, "b": 0.9, "c": 0.7}, 1, combine=max)
    assert kept == {"b": 0.9, "other": 0.7} and n == 2
    kept, n = fold_top({"a": 1, "b": 1}, 5)
    assert kept == {"a": 1, "b": 1} and n == 0
    # A process really named "other" cannot be confused with the fold.
    kept, n = fold_top({"other": 3, "x": 1}, 5)
    assert kept == {"x": 1, "other": 3} and n == 1
    # Ties break by name: the same set survives every scrape.
    assert fold_top({"z": 1, "y": 1, "x": 1}, 2)[0] == {"x": 1, "y": 1, "other": 1}


def flag(kind: str, comm: str, seconds: float) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, comm=comm, pid=1, seconds=seconds, state="CLOSE_WAIT")


def leak_report(n_comms: int = 3) -> SimpleNamespace:
    flags = [flag("close_wait", f"srv{i}", 10.0 * (i + 1)) for i in range(n_comms) for _ in range(i + 1)]
    flags.append(flag("idle_established", "nginx", 400.0))
    return SimpleNamespace(
        flags=flags,
        time_wait=[("10.1.2.3:443", 900, 28232), ("10.9.9.9:80", 100, 28232), ("[fd00::1]:8080", 5, 28232)],
        inventory_states={"TIME_WAIT": 1005},
        processes={
            100: SimpleNamespace(comm="api", open_fds=900, max_fds=1024, close_wait=7),
            101: SimpleNamespace(comm="api", open_fds=10, max_fds=1024, close_wait=3),
            102: SimpleNamespace(comm="cron", open_fds=5, max_fds=1024, close_wait=0),
        },
    )


def test_leak_metrics() -> None:
    reg, folded = render(ScrapeInput(leaks=leak_report()), ExportOptions(time_wait_top=2))
    assert reg.get("pytracer_flagged_sockets", kind="close_wait", comm="srv2") == 3
    assert reg.get("pytracer_flagged_sockets", kind="idle_established", comm="nginx") == 1
    assert reg.get("pytracer_flagged_oldest_seconds", kind="close_wait") == 30.0
    assert reg.get("pytracer_flagged_oldest_seconds", kind="fd_exhaustion") == 0.0
    # Destinations are ranks by default: no addresses in labels.
    assert reg.series("pytracer_time_wait_sockets") == {
        (("destination", "top1"),): 900, (("destination", "top2"),): 100, (("destination", "other"),): 5,
    }
    assert reg.get("pytracer_time_wait_port_usage_ratio", destination="top1") == pytest.approx(900 / 28232)
    assert "10.1.2.3" not in reg.text and "fd00::1" not in reg.text
    assert folded["destination"] == 1 and folded.get("comm", 0) == 0
    assert reg.get("pytracer_process_fd_usage_ratio", comm="api") == pytest.approx(900 / 1024)
    assert reg.get("pytracer_close_wait_sockets", comm="api") == 10
    assert reg.get("pytracer_close_wait_sockets", comm="cron") == 0


def test_oldest_gauge_exists_for_every_detector_kind() -> None:
    # One list of kinds: the detectors' own, so a new detector gets its zero
    # series before its first flag (a missing series is not a zero in PromQL).
    reg, _ = render(ScrapeInput(leaks=SimpleNamespace(flags=[flag("last_ack_stuck", "api", 7.0)])))
    kinds = {dict(lab)["kind"]: v for lab, v in reg.series("pytracer_flagged_oldest_seconds").items()}
    assert set(kinds) == set(KINDS)
    assert kinds["last_ack_stuck"] == 7.0
    assert all(v == 0.0 for k, v in kinds.items() if k != "last_ack_stuck")


def test_addresses_only_with_the_option() -> None:
    reg, _ = render(ScrapeInput(leaks=leak_report()), ExportOptions(time_wait_top=5, label_addresses=True))
    assert reg.get("pytracer_time_wait_sockets", destination="10.1.2.3:443") == 900
    assert reg.get("pytracer_time_wait_sockets", destination="[fd00::1]:8080") == 5


def test_comm_labels_are_capped_and_folded() -> None:
    reg, folded = render(ScrapeInput(leaks=leak_report(n_comms=30)), ExportOptions(max_comms=5))
    comms = {dict(lab)["comm"] for lab, _ in reg.series("pytracer_flagged_sockets").items()
             if dict(lab)["kind"] == "close_wait"}
    assert len(comms) == 6 and "other" in comms
    # the five busiest survive
    assert {f"srv{i}" for i in range(25, 30)} <= comms
    total = sum(v for lab, v in reg.series("pytracer_flagged_sockets").items() if dict(lab)["kind"] == "close_wait")
    assert total == sum(range(1, 31))  # folding loses no socket
    assert folded["comm"] == 25


def test_program_stats_and_lost_events() -> None:
    progs = [families.ProgramStat("state_tp_btf", 5_000_000, 1000, 2), families.ProgramStat("destroy_tp_btf", 0, 0, 1)]
    reg, _ = render(ScrapeInput(totals=make_totals([abi.PtAgg()]), programs=progs, bpf_stats=True))
    assert reg.get("pytracer_lost_events_total", reason="recursion_miss") == 3
    assert reg.get("pytracer_bpf_program_run_seconds_total", program="state_tp_btf") == pytest.approx(0.005)
    assert reg.get("pytracer_bpf_program_runs_total", program="state_tp_btf") == 1000
    # stats off and nothing counted: no run-time series at all
    progs0 = [families.ProgramStat("state_tp_btf", 0, 0, 0)]
    reg, _ = render(ScrapeInput(programs=progs0, bpf_stats=False))
    assert not reg.series("pytracer_bpf_program_runs_total")


def test_build_and_hook_info() -> None:
    inp = ScrapeInput(build={"version": "0.1.0", "backend": "core", "kernel": "6.18"},
                      hooks=[("state", "tp_btf", "state_tp_btf"), ("reset", "none", "")],
                      maps=[families.MapStat("socks", 12, 1024), families.MapStat("owners", None, 1024)])
    reg, _ = render(inp)
    assert reg.get("pytracer_build_info", version="0.1.0", backend="core", kernel="6.18") == 1
    assert reg.get("pytracer_hook_info", hook="state", kind="tp_btf", program="state_tp_btf") == 1
    assert reg.get("pytracer_map_entries", map="socks") == 12
    assert reg.get("pytracer_map_entries", map="owners") is None  # unread: absent, not 0
    assert reg.get("pytracer_map_capacity_entries", map="owners") == 1024


def service_stats() -> list:
    from pytracer.kernel.histogram import Histogram
    from pytracer.table.services import ENDERS, ServiceStats

    def h(*seconds: float) -> Histogram:
        slots = [0] * abi.PT_HIST_SLOTS
        for x in seconds:
            slots[slot_of(int(x * 1e6))] += 1
        return Histogram(tuple(slots), int(sum(seconds) * 1e6))

    empty = {e: Histogram.empty() for e in ENDERS}
    return [
        ServiceStats("5432", "client", ends=4, lifetime=h(100, 100, 100, 100),
                     idle={**empty, "reset_received": h(300, 300, 301), "local_close": h(1)}),
        ServiceStats("80", "server", ends=0, idle=dict(empty)),
        ServiceStats("other", "", ends=7, lifetime=h(*[0.01] * 7), idle={**empty, "local_close": h(*[0.005] * 7)}),
    ]


def test_service_families_bounded_labels_and_exact_buckets() -> None:
    reg, _ = render(ScrapeInput(services=service_stats()))
    ended = reg.series("pytracer_service_connections_ended_total")
    by_service: dict = {}
    for labels, v in ended.items():
        key = (dict(labels)["service"], dict(labels)["role"])
        by_service.setdefault(key, {})[dict(labels)["ender"]] = v
    assert by_service[("5432", "client")] == {"local_close": 1, "peer_fin": 0, "reset_received": 3,
                                              "local_abort": 0, "timeout": 0, "never_established": 0}
    assert sum(by_service[("other", "")].values()) == 7
    # A named service that never ended a connection has no series yet.
    assert ("80", "server") not in by_service
    assert reg.get("pytracer_connection_idle_before_end_seconds_count", service="5432", role="client",
                   ender="reset_received") == 3
    assert reg.get("pytracer_connection_idle_before_end_seconds_bucket", service="5432", role="client",
                   ender="reset_received", le="268.435456") == 0
    assert reg.get("pytracer_connection_idle_before_end_seconds_bucket", service="5432", role="client",
                   ender="reset_received", le="536.870912") == 3
    assert reg.get("pytracer_connection_idle_before_end_seconds_count", service="5432", role="client",
                   ender="peer_fin") is None
    assert reg.get("pytracer_service_connection_lifetime_seconds_count", service="other", role="") == 7


def test_idle_reset_flag_gauges() -> None:
    rep = leak_report()
    rep.flags.append(SimpleNamespace(kind="idle_reset", comm="api", pid=1, seconds=300.0,
                                     extra={"service": "5432", "role": "client", "t_seconds": 300.0, "hits": 3}))
    reg, _ = render(ScrapeInput(leaks=rep))
    assert reg.get("pytracer_idle_reset_seconds", service="5432", role="client") == 300.0
    assert reg.get("pytracer_idle_reset_connections", service="5432", role="client") == 3
    assert reg.get("pytracer_flagged_sockets", kind="idle_reset", comm="api") == 1


def test_kprobe_misses_are_lost_events_only_where_the_kernel_counts_them() -> None:
    progs = [families.ProgramStat("state_kprobe", 0, 900, 1, 4), families.ProgramStat("accept_kretprobe", 0, 90, 0, 2),
             families.ProgramStat("state_tp_btf", 0, 10, 0)]
    reg, _ = render(ScrapeInput(totals=make_totals([abi.PtAgg()]), programs=progs, bpf_stats=True))
    assert reg.get("pytracer_lost_events_total", reason="kprobe_miss") == 6
    assert reg.get("pytracer_lost_events_total", reason="recursion_miss") == 1
    assert reg.get("pytracer_bpf_program_kprobe_misses_total", program="state_kprobe") == 4
    assert {dict(lab)["program"] for lab in reg.series("pytracer_bpf_program_kprobe_misses_total")} == {
        "state_kprobe", "accept_kretprobe"}
    # A kernel that does not say (before 6.7), or no kprobe at all: no series, not a zero.
    unknown = [families.ProgramStat("state_kprobe", 0, 9, 0)]
    reg, _ = render(ScrapeInput(totals=make_totals([abi.PtAgg()]), programs=unknown))
    assert not reg.series("pytracer_bpf_program_kprobe_misses_total")
    assert ("reason", "kprobe_miss") not in {lab for labs in reg.series("pytracer_lost_events_total") for lab in labs}
