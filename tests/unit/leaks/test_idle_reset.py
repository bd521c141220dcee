"""The idle_reset rule, on hand-built per-service histograms."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pytracer.inventory.procs import ProcFacts
from pytracer.kernel.abi import PT_HIST_SLOTS
from pytracer.kernel.histogram import Histogram, slot_of
from pytracer.leaks.detectors import KINDS, idle_reset_flags, ordered
from pytracer.leaks.thresholds import Thresholds


def hist(*seconds: float) -> Histogram:
    slots = [0] * PT_HIST_SLOTS
    for s in seconds:
        slots[slot_of(int(s * 1e6))] += 1
    return Histogram(tuple(slots), int(sum(seconds) * 1e6))


def svc(port: int = 5432, role: str = "client", owners: dict[str, int] | None = None, **idle: Any) -> Any:
    return SimpleNamespace(service=str(port), role=role, idle={k: hist(*v) for k, v in idle.items()},
                           owners=owners or {"reset_received": 4242, "peer_fin": 4242})


PROCS = {4242: ProcFacts(pid=4242, comm="api", cmdline="api --pool", cgroup=None, container=None,
                         open_fds=10, max_fds=1024)}


def test_resets_at_one_idle_time_name_t_spread_count_pid_and_fix() -> None:
    [f] = idle_reset_flags([svc(reset_received=[3.3, 3.35, 3.4, 3.31, 3.45])], PROCS, Thresholds())
    assert f.kind == "idle_reset" and f.kind in KINDS
    assert abs(slot_of(int(f.extra["t_seconds"] * 1e6)) - slot_of(3_000_000)) <= 1
    assert f.extra["hits"] == 5 and f.extra["resets"] == 5 and f.extra["peer_fins"] == 0
    assert 0 < f.extra["spread_seconds"] < 1.1
    assert f.pid == 4242 and f.comm == "api" and f.rport == 5432 and f.lport is None
    assert "Fix: set an idle timeout or TCP keepalive below" in f.detail
    assert "pid 4242 (api)" in f.detail


def test_a_client_closed_by_the_peer_at_one_idle_time_is_flagged() -> None:
    [f] = idle_reset_flags([svc(peer_fin=[60.1, 60.2, 60.05, 60.3])], PROCS, Thresholds())
    assert f.extra["peer_fins"] == 4 and "closed by the peer" in f.detail


def test_a_server_whose_clients_close_idle_connections_is_not_flagged() -> None:
    # The clients' own pool timeout: orderly, nothing to fix on the server.
    assert idle_reset_flags([svc(role="server", peer_fin=[1.5] * 10)], PROCS, Thresholds()) == []


def test_a_server_reset_at_one_idle_time_is_flagged_on_its_listener_port() -> None:
    [f] = idle_reset_flags([svc(port=8080, role="server", reset_received=[30.0] * 4)], PROCS, Thresholds())
    assert f.lport == 8080 and f.rport is None


def test_no_flag_below_the_minimum_hits_or_idle() -> None:
    th = Thresholds()
    assert idle_reset_flags([svc(reset_received=[3.3, 3.3])], PROCS, th) == []
    # Resets right after data (a crashing peer) are no idle timeout.
    assert idle_reset_flags([svc(reset_received=[0.01] * 20)], PROCS, th) == []


def test_no_flag_without_a_peak() -> None:
    spread = [1.2, 2.5, 5.0, 9.0, 17.0, 33.0, 70.0, 150.0, 300.0, 600.0]
    assert idle_reset_flags([svc(reset_received=spread)], PROCS, Thresholds()) == []


def test_no_flag_when_the_local_side_already_retires_idle_connections_first() -> None:
    s = svc(reset_received=[3.3] * 4, local_close=[1.5] * 50)
    assert idle_reset_flags([s], PROCS, Thresholds()) == []
    # ...but a pool that keeps them longer than T is exactly the case.
    s = svc(reset_received=[3.3] * 4, local_close=[120.0] * 50)
    assert len(idle_reset_flags([s], PROCS, Thresholds())) == 1


def test_other_is_never_flagged_and_flags_rank_with_process_trends() -> None:
    other = svc(reset_received=[3.3] * 10)
    other.service, other.role = "other", ""
    assert idle_reset_flags([other], PROCS, Thresholds()) == []
    [f] = idle_reset_flags([svc(reset_received=[3.3] * 4)], {}, Thresholds())
    assert f.comm is None and "pid 4242" in f.detail
    assert ordered([f])[0] is f


def test_a_scan_judges_the_snapshots_services_and_reads_proc_only_for_flagged_pids() -> None:
    from pytracer.leaks.report import LeakReport
    from pytracer.leaks.scanner import Scanner

    class NoMaps:  # a tracer whose maps must not be read: the snapshot has the services
        obj = object()

        def map(self, name: str) -> Any:
            raise AssertionError(f"map {name} read again")

    sc = Scanner(NoMaps(), Thresholds())
    asked: list[int] = []
    sc._proc_facts = lambda pid: asked.append(pid) or PROCS.get(pid)  # type: ignore[method-assign]
    quiet = svc(port=6379, owners={"local_close": 777, "peer_fin": 778}, local_close=[1.0, 2.0])
    flagged = svc(reset_received=[3.3, 3.35, 3.4, 3.31, 3.45])
    rep = LeakReport(mono_ns=0, wall=0.0)
    sc._idle_resets(rep, SimpleNamespace(services=[quiet, flagged]))
    assert not rep.errors and rep.services == [quiet, flagged]
    [f] = rep.flags
    assert f.kind == "idle_reset" and f.pid == 4242 and f.comm == "api" and "pid 4242 (api)" in f.detail
    assert f == idle_reset_flags([quiet, flagged], PROCS, Thresholds())[0]
    assert asked == [4242]  # not the quiet service's processes
    rep = LeakReport(mono_ns=0, wall=0.0)
    sc._idle_resets(rep, SimpleNamespace(services=[quiet]))
    assert rep.flags == [] and asked == [4242]  # nothing flagged: no /proc read
