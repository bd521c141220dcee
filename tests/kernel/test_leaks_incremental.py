"""The candidate scans between full scans (pytracer.leaks.incremental),
against real leaky processes and ``ss -tanpie``.

Each scenario takes one full scan *before* its sockets exist, so the
sockets are first judged by a candidate scan (``Scanner.last_kind``), and
checks the flags against ss and the workloads' own pids and fds, as
tests/kernel/test_leaks.py does for full scans.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from pytracer.leaks.detectors import Thresholds
from pytracer.leaks.scanner import Scanner

from .leaky_support import LeakNet, client_argv, server_argv, ss, wait_until
from .test_leaks import hang_up_held, held_by, ours, why

pytestmark = pytest.mark.kernel
pytest_plugins = ["tests.kernel.conftest_leaks"]

NETS = ["loopback4", "veth6"]


def incremental(tracer: Any, pids: list[int] | None = None, **th: Any) -> Scanner:
    sc = Scanner(tracer, Thresholds(**th), pids=pids or (), incremental=True)
    sc.scan()
    assert sc.last_kind == "full"
    return sc


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_close_wait_held_by_fd_from_candidates(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    sc = incremental(leak_tracer, close_wait_after=1.0)
    connected, closed, accepted, rows = hang_up_held(net, spawn, srv, port, 4)
    time.sleep(1.3)
    rep = sc.scan()
    after = time.monotonic()
    assert sc.last_kind == "candidates"
    assert not [e for e in rep.errors if "scan:" in e], rep.errors
    got = ours(rep, "close_wait", port, {net.netns_ino(net.server_ns)})
    assert set(got) == {r.cookie for r in rows}, why(rep, [r.cookie for r in rows])
    for row in rows:
        f = got[row.cookie]
        assert f.held_by == "fd" and (f.pid, f.fd) == held_by(row) == (srv.pid, accepted[row.rport])
        assert f.inode == row.ino != 0
        assert (f.laddr, f.lport, f.raddr, f.rport) == (row.laddr, row.lport, row.raddr, row.rport)
        assert not f.at_least
        assert rep.mono_ns / 1e9 - closed - 0.05 <= f.seconds <= after - connected + 0.05
    assert rep.processes[srv.pid].close_wait == 4
    # Bounded: the fd scan looked at the candidates' processes, not the host.
    assert rep.stats["processes_scanned"] < sc.carried["processes_scanned"], rep.stats


@pytest.mark.parametrize("leak_net", ["loopback4"], indirect=True)
def test_close_wait_backlog_from_candidates(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("noaccept", net.server_host, "--backlog", 16), net.server_ns, "server")
    listening = srv.expect("listening")
    port = listening["port"]
    sc = incremental(leak_tracer, close_wait_after=1.0)
    cli = spawn(client_argv("hangup", net.server_host, port, 3), net.client_ns, "client")
    cli.expect("closed")
    rows = wait_until(lambda: (lambda x: x if len(x) == 3 else None)(
        [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT"]), 10, "3 in the backlog")
    listener = next(r for r in ss(net.server_ns, port) if r.state == "LISTEN")
    time.sleep(1.3)
    rep = sc.scan()
    assert sc.last_kind == "candidates"
    got = ours(rep, "close_wait", port, {net.netns_ino(net.server_ns)})
    assert set(got) == {r.cookie for r in rows}, why(rep, [r.cookie for r in rows])
    for f in got.values():
        assert f.held_by == "backlog" and f.pid == srv.pid == held_by(listener)[0]
        assert f.extra["listener_fd"] == listening["fd"] == held_by(listener)[1]
        assert f.extra["backlog_queued"] == listener.recv_q == 3
        assert f.extra["backlog_limit"] == listener.send_q == 16
    assert rep.processes[srv.pid].close_wait_backlog == 3


@pytest.mark.parametrize("leak_net", ["loopback4"], indirect=True)
def test_idle_keepalive_from_candidates(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    cli = spawn(client_argv("keepalive", net.server_host, port, "--idle", 3, "--chatty", 3, "--every", 0.2),
                net.client_ns, "client")
    # Scoped to the scenario's processes: other tests' idle connections on
    # this host must not take the per-scan budget of judged sockets.  Its
    # connections are younger than idle_after at this full scan.
    sc = incremental(leak_tracer, [srv.pid, cli.pid], idle_after=2.0)
    cli.expect("ready")
    deadline = time.monotonic() + 8
    got: dict = {}
    # A scan a second, as tracer watch does: each connection crosses
    # idle_after between two scans and is asked about then.
    while time.monotonic() < deadline:
        rep = sc.scan()
        assert sc.last_kind == "candidates"
        got = ours(rep, "idle_established", port, {net.netns_ino(net.server_ns), net.netns_ino(net.client_ns)})
        if len(got) >= 6:
            break
        time.sleep(1.0)
    idle, busy = set(), set()
    for ns in {net.server_ns, net.client_ns}:
        for r in ss(ns, port):
            if r.state == "ESTAB":
                (idle if min(r.ms("lastsnd") or 0, r.ms("lastrcv") or 0) >= 2000 else busy).add(r.cookie)
    assert len(idle) == 6 and len(busy) == 6
    assert set(got) == idle
    for r in ss(net.server_ns, port):
        if r.cookie in got:
            assert (got[r.cookie].pid, got[r.cookie].fd) == held_by(r)
            assert got[r.cookie].idle_seconds >= 2.0


@pytest.mark.parametrize("leak_net", ["veth4"], indirect=True)
def test_time_wait_pressure_between_full_scans(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    """TIME_WAIT per destination refreshes from a TIME_WAIT-only dump on its
    own cadence, not only with full scans; checked against ss."""
    net = leak_net
    subprocess.run(["ip", "netns", "exec", str(net.client_ns), "sysctl", "-qw",
                    "net.ipv4.ip_local_port_range=40000 40099"], check=True, timeout=20)
    srv = spawn(server_argv("serve", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    sc = incremental(leak_tracer, top=100000)
    ns = net.netns_ino(net.client_ns)
    dest = f"{net.server_host}:{port}@netns:{ns}"
    spawn(client_argv("storm", net.server_host, port, 70), net.client_ns, "storm").expect("done", timeout=60)
    truth = [r for r in ss(net.client_ns, port) if r.state == "TIME-WAIT"]
    assert len(truth) == 70

    # Not due yet: the candidate scan carries the full scan's (empty) list.
    sc.time_wait_every = 3600.0
    rep = sc.scan()
    assert sc.last_kind == "candidates"
    assert dest not in {d for d, _, _ in rep.time_wait}

    sc.time_wait_every = 0.0
    rep = sc.scan()
    assert sc.last_kind == "candidates"
    assert "time_wait_dump_seconds" in rep.stats, rep.stats
    assert (dest, len(truth), 100) in rep.time_wait, rep.time_wait
    (flag,) = [f for f in rep.flags if f.kind == "time_wait_pressure" and f.netns == ns]
    assert (flag.raddr, flag.rport) == (net.server_host, port)
    assert flag.extra["time_wait"] == len(truth)
    # The minisockets counted for the views, as ss counts them in that namespace.
    assert rep.inventory_states.get("TIME_WAIT", 0) >= len(truth)


@pytest.mark.parametrize("leak_net", ["loopback4"], indirect=True)
def test_idle_flags_are_carried_between_rechecks(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    """A socket flagged idle is asked tcp_info once per idle_recheck, its
    flag carried in between as measured (ss shows it idle for longer since);
    when its connection closes, the next scan drops it."""
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    cli = spawn(client_argv("keepalive", net.server_host, port, "--idle", 3), net.client_ns, "client")
    cli.expect("ready")
    sc = incremental(leak_tracer, [srv.pid, cli.pid], idle_after=1.0, idle_recheck=2.5)
    nss = {net.netns_ino(net.server_ns), net.netns_ino(net.client_ns)}

    def truth() -> dict[int, float]:
        """cookie -> idle seconds (no data either way), per ss, of the scenario's connections."""
        return {r.cookie: min(r.ms("lastsnd") or 0, r.ms("lastrcv") or 0) / 1000
                for ns in {net.server_ns, net.client_ns} for r in ss(ns, port) if r.state == "ESTAB"}

    time.sleep(1.3)
    first = sc.scan()  # every connection crossed idle_after since the full scan: asked and flagged
    t_first = time.monotonic()
    got = ours(first, "idle_established", port, nss)
    assert len(truth()) == 6 and set(got) == set(truth()), why(first, list(truth()))
    assert first.stats["info_queries"] >= 6 and first.stats["idle_carried"] == 0, first.stats

    time.sleep(1.0)
    second = sc.scan()  # within idle_recheck: carried, not asked again
    ss_idle = truth()
    assert sc.last_kind == "candidates" and time.monotonic() - t_first < 2.5
    carried = ours(second, "idle_established", port, nss)
    assert set(carried) == set(ss_idle), why(second, list(ss_idle))
    assert second.stats["info_queries"] == 0 and second.stats["idle_carried"] == 6, second.stats
    for cookie, f in carried.items():
        assert f.idle_seconds == got[cookie].idle_seconds  # as measured by the first scan
        assert 0.5 < ss_idle[cookie] - f.idle_seconds < 1.5, (f.idle_seconds, ss_idle[cookie])

    time.sleep(max(0.0, t_first + 2.7 - time.monotonic()))
    third = sc.scan()  # idle_recheck passed: asked again
    assert set(ours(third, "idle_established", port, nss)) == set(ss_idle)
    assert third.stats["info_queries"] >= 6 and third.stats["idle_carried"] == 0, third.stats

    cli.kill()  # every connection closes: the client's ends go, the server's leave ESTABLISHED
    wait_until(lambda: not truth() or None, 10, "the connections closed")
    fourth = sc.scan()
    assert not ours(fourth, "idle_established", port, nss), fourth.flags
