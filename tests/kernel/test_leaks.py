"""Leak detection against real leaky processes, checked against ``ss -tanpie``.

Each scenario runs real programs (tests/kernel/leaky_*.py, nginx) in
subprocesses, on loopback and across a veth pair between two network
namespaces, then compares what the Scanner flags (cookie, pid, fd, inode,
state, seconds) with what ss reports for the same sockets, and with the
test's own clock.  Assertions look only at the scenario's own port, pids and
namespaces: other tests run on this host at the same time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from pytracer.inventory.seed import seed
from pytracer.kernel import abi
from pytracer.leaks.detectors import Flag, Thresholds
from pytracer.leaks.scanner import LeakReport, Scanner
from pytracer.table import reads

from .leaky_support import (
    PYTHON,
    LeakNet,
    SsRow,
    client_argv,
    loopback_pair,
    server_argv,
    ss,
    wait_until,
)

pytest_plugins = ["tests.kernel.conftest_leaks"]
pytestmark = pytest.mark.kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL_NETS = ["loopback4", "loopback6", "veth4", "veth6"]
NETS = ["loopback4", "veth4"]


def ours(rep: LeakReport, kind: str, port: int, netns: set[int] | None = None) -> dict[int, Flag]:
    """Flags of one kind on the scenario's port (either end), by cookie."""
    return {
        f.cookie: f
        for f in rep.flags
        if f.kind == kind and port in (f.lport, f.rport) and (netns is None or f.netns in netns) and f.cookie
    }


def held_by(row: SsRow) -> tuple[int, int]:
    assert row.users, f"ss shows no process for {row}"
    comm, pid, fd = min(row.users, key=lambda u: (u[1], u[2]))
    return pid, fd


def scan(tracer: Any, **th: Any) -> LeakReport:
    """A host-wide scan (other tests' sockets share this host)."""
    scanner = Scanner(tracer, Thresholds(**th))
    rep = scanner.scan()
    assert not [e for e in rep.errors if "scan:" in e], rep.errors
    rep.facts = scanner.last_facts  # type: ignore[attr-defined]  # for failure messages
    return rep


def why(rep: LeakReport, cookies: Any) -> str:
    """What the scan knew about these sockets, for a failure message."""
    facts = [f.to_json() for f in getattr(rep, "facts", []) if f.cookie in set(cookies)]
    return json.dumps({"stats": rep.stats, "errors": rep.errors, "facts": facts}, default=str)[:6000]


# --- CLOSE_WAIT held by a process fd ------------------------------------------------------



def hang_up_held(net: LeakNet, spawn: Any, srv: Any, port: int, n: int) -> tuple[float, float, dict[int, int], list]:
    """n clients connect to a "hold" server and hang up; the server keeps
    every accepted fd open.  Returns the clients' connect and close clocks,
    the server's accepted fd by client port, and ss's CLOSE-WAIT rows, once
    ss shows all n held by the server."""
    cli = spawn(client_argv("hangup", net.server_host, port, n), net.client_ns, "client")
    connected = cli.expect("connected")["t"]
    closed = cli.expect("closed")["t"]
    accepted = {e["rport"]: e["fd"] for e in [srv.expect("accepted") for _ in range(n)]}

    def truth() -> list[SsRow] | None:
        rows = [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT" and r.lport == port]
        return rows if len(rows) == n and all(r.users for r in rows) else None

    return connected, closed, accepted, wait_until(truth, 10, f"{n} CLOSE-WAIT sockets held by the server")

@pytest.mark.parametrize("leak_net", ALL_NETS, indirect=True)
def test_close_wait_held_by_fd(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    connected, closed, accepted, rows = hang_up_held(net, spawn, srv, port, 4)
    time.sleep(1.3)
    rep = scan(leak_tracer, close_wait_after=1.0)
    after = time.monotonic()

    got = ours(rep, "close_wait", port, {net.netns_ino(net.server_ns)})
    expected = {r.cookie: r for r in rows}
    assert set(got) == set(expected), why(rep, expected)
    for cookie, row in expected.items():
        f = got[cookie]
        assert f.held_by == "fd"
        assert (f.pid, f.fd) == held_by(row) == (srv.pid, accepted[row.rport])
        assert f.inode == row.ino != 0
        assert f.state == "CLOSE_WAIT"
        assert (f.laddr, f.lport, f.raddr, f.rport) == (row.laddr, row.lport, row.raddr, row.rport)
        assert f.family == ("ipv4" if net.family == 4 else "ipv6")
        assert f.comm.startswith("python")
        # The tracer saw the transition: exact, and matching the test's clock.
        assert not f.at_least
        assert rep.mono_ns / 1e9 - closed - 0.05 <= f.seconds <= after - connected + 0.05
        assert f.detail and "fd " + str(f.fd) in f.detail
    # The per-process facts agree.
    p = rep.processes[srv.pid]
    assert p.close_wait == 4 and p.close_wait_backlog == 0
    assert p.open_fds == len(os.listdir(f"/proc/{srv.pid}/fd"))


# --- CLOSE_WAIT in a backlog ---------------------------------------------------------------


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_close_wait_never_accepted(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("noaccept", net.server_host, "--backlog", 16), net.server_ns, "server")
    listening = srv.expect("listening")
    port = listening["port"]
    cli = spawn(client_argv("hangup", net.server_host, port, 3), net.client_ns, "client")
    cli.expect("closed")

    def truth() -> list[SsRow] | None:
        rows = [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT" and r.lport == port]
        return rows if len(rows) == 3 else None

    rows = wait_until(truth, 10, "3 CLOSE-WAIT sockets in the backlog")
    assert all(r.ino == 0 and not r.users for r in rows)  # ss: no file, no process
    listener = next(r for r in ss(net.server_ns, port) if r.state == "LISTEN")
    time.sleep(1.3)
    ns = {net.netns_ino(net.server_ns)}
    # Host-wide, and scoped to the server's pid: the same sockets.
    for rep in (scan(leak_tracer, close_wait_after=1.0),
                Scanner(leak_tracer, Thresholds(close_wait_after=1.0), pids=[srv.pid]).scan()):
        got = ours(rep, "close_wait", port, ns)
        assert set(got) == {r.cookie for r in rows}
        for f in got.values():
            assert f.held_by == "backlog"
            assert f.pid == srv.pid == held_by(listener)[0]
            assert f.fd is None and f.inode is None
            assert f.extra["listener_fd"] == listening["fd"] == held_by(listener)[1]
            assert f.extra["backlog_queued"] == listener.recv_q == 3
            assert f.extra["backlog_limit"] == listener.send_q == 16
            assert "accept" in f.detail
        assert rep.processes[srv.pid].close_wait_backlog == 3


# --- idle keep-alive ------------------------------------------------------------------------------


def _idle_truth(net: LeakNet, port: int, idle_ms: int) -> tuple[set[int], set[int]]:
    """(cookies idle >= idle_ms, cookies not idle) per ss -i lastsnd/lastrcv, both ends."""
    idle, busy = set(), set()
    for ns in {net.server_ns, net.client_ns}:
        for r in ss(ns, port):
            if r.state != "ESTAB":
                continue
            quiet = min(r.ms("lastsnd") or 0, r.ms("lastrcv") or 0)
            (idle if quiet >= idle_ms else busy).add(r.cookie)
    return idle, busy


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_idle_keepalive_flagged_busy_not(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    cli = spawn(client_argv("keepalive", net.server_host, port, "--idle", 3, "--chatty", 3, "--every", 0.2),
                net.client_ns, "client")
    cli.expect("ready")
    conns = [e for e in cli.events if e.get("event") == "conn"]
    idle_ports = {e["lport"] for e in conns if e["kind"] == "idle"}
    chatty_ports = {e["lport"] for e in conns if e["kind"] == "chatty"}
    time.sleep(3.0)
    # Scoped to this scenario's processes: other tests' connections on this
    # host must not take the tcp_info budget.
    rep = Scanner(leak_tracer, Thresholds(idle_after=2.0), pids=[srv.pid, cli.pid]).scan()
    idle, busy = _idle_truth(net, port, 2000)
    nss = {net.netns_ino(net.server_ns), net.netns_ino(net.client_ns)}
    got = ours(rep, "idle_established", port, nss)
    assert len(idle) == 6 and len(busy) == 6  # 3 idle and 3 chatty connections, both ends
    assert set(got) == idle
    assert not set(got) & busy
    for f in got.values():
        client_port = f.lport if f.rport == port else f.rport
        assert client_port in idle_ports and client_port not in chatty_ports
        assert f.idle_seconds >= 2.0
        assert f.pid == (srv.pid if f.lport == port else cli.pid)
        assert f.fd is not None and f.held_by == "fd"
    # pid and fd agree with ss for the server end.
    for r in ss(net.server_ns, port):
        if r.cookie in got:
            assert (got[r.cookie].pid, got[r.cookie].fd) == held_by(r)


# --- sockets older than the tracer ------------------------------------------------------------------


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_preexisting_sockets_found_with_owner(leak_net: LeakNet, spawn: Any, monkeypatch: Any) -> None:
    from pytracer.kernel.core import Tracer
    from pytracer.table import writer

    # Records are built and written a few at a time: this scenario's sockets
    # (and the host's) span many chunks, and owners are named across them.
    monkeypatch.setattr(writer, "SEED_CHUNK", 3)
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    hang = spawn(client_argv("hangup", net.server_host, port, 3), net.client_ns, "hangup")
    closed = hang.expect("closed")["t"]
    keep = spawn(client_argv("keepalive", net.server_host, port, "--idle", 2), net.client_ns, "keepalive")
    keep.expect("ready")

    def truth() -> list[SsRow] | None:
        rows = [r for r in ss(net.server_ns, port) if r.lport == port]
        cw = [r for r in rows if r.state == "CLOSE-WAIT" and r.users]
        est = [r for r in rows if r.state == "ESTAB" and r.users]
        return rows if len(cw) == 3 and len(est) == 2 else None

    wait_until(truth, 10, "3 CLOSE-WAIT and 2 ESTAB server sockets")
    time.sleep(1.5)
    # Full sockets of this scenario on both ends (minisockets are not seeded).
    rows = [r for ns in {net.server_ns, net.client_ns} for r in ss(ns, port)
            if r.state in ("LISTEN", "ESTAB", "CLOSE-WAIT") and not (r.timer or "").startswith("timewait")]
    assert len(rows) == 1 + 3 + 2 + 2

    with Tracer() as tracer:  # started after every socket above exists
        res = seed(tracer)
        assert res.seeded >= len(rows) and not res.failed, res.summary()
        socks = tracer.map("socks")
        for r in rows:
            raw = socks.lookup(int(r.cookie).to_bytes(8, sys.byteorder), reads.SOCK_DTYPE.itemsize)
            assert raw is not None, f"socket {r} not seeded"
            rec = np.frombuffer(raw, reads.SOCK_DTYPE)[0]
            assert rec["flags"] & abi.PT_F_SEEDED and rec["flags"] & abi.PT_F_BIRTH_UNKNOWN
            assert rec["birth_ns"] == 0 and rec["counted"] == 0
            assert {"LISTEN": 10, "ESTAB": 1, "CLOSE-WAIT": 8}[r.state] == rec["state"]
            assert int(rec["ino"]) == r.ino and (int(rec["lport"]), int(rec["rport"])) == (r.lport, r.rport)
            pid, fd = held_by(r)
            assert (int(rec["owner_tgid"]), int(rec["owner_fd"])) == (pid, fd)
            ns = net.server_ns if r.lport == port else net.client_ns
            assert int(rec["netns_ino"]) == net.netns_ino(ns)

        rep = scan(tracer, close_wait_after=1.0, idle_after=1.0)
        now = time.monotonic()
        cw = ours(rep, "close_wait", port, {net.netns_ino(net.server_ns)})
        cw_truth = [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT"]
        assert set(cw) == {r.cookie for r in cw_truth}
        for r in cw_truth:
            f = cw[r.cookie]
            assert (f.pid, f.fd) == held_by(r)
            # Older than the tracer: a lower bound, from the kernel's own clock,
            # and never more than the truth.
            assert f.at_least
            assert 1.5 <= f.seconds <= now - closed + 0.05
        idle = ours(rep, "idle_established", port)
        keep_ports = {e["lport"] for e in keep.events if e.get("event") == "conn"}
        assert {f.lport if f.rport == port else f.rport for f in idle.values()} == keep_ports
        assert len(idle) == 4  # both ends of both idle connections


# --- a clean workload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_clean_workload_raises_no_flags(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("serve", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    busy = spawn(client_argv("keepalive", net.server_host, port, "--chatty", 3, "--every", 0.1),
                 net.client_ns, "busy")
    busy.expect("ready")
    storm = spawn(client_argv("storm", net.server_host, port, 3000), net.client_ns, "storm")
    storm.expect("done", timeout=120)
    pids = {srv.pid, busy.pid, storm.pid}
    nss = {net.netns_ino(net.server_ns), net.netns_ino(net.client_ns)}

    scanner = Scanner(leak_tracer, Thresholds(close_wait_after=1.0, idle_after=1.0, last_ack_after=1.0, top=100000))
    reps = []
    for _ in range(5):  # enough polls for the growth rule to judge
        reps.append(scanner.scan())
        time.sleep(0.5)
    rep = reps[-1]
    tw_truth = [r for r in ss(net.client_ns, port) if r.state == "TIME-WAIT" and r.rport == port]
    for r in reps:
        mine = [f for f in r.flags if f.pid in pids or port in (f.lport, f.rport)
                or (net.kind == "veth" and f.netns in nss)]
        assert mine == [], [f.to_json() for f in mine]
    # TIME_WAIT per destination agrees with ss, and is far from the port range.
    dest = f"{net.server_host}:{port}"
    if net.kind == "veth":
        dest += f"@netns:{net.netns_ino(net.client_ns)}"
    counts = {d: (n, size) for d, n, size in rep.time_wait}
    argv = ["sysctl", "-n", "net.ipv4.ip_local_port_range"]
    if net.client_ns:
        argv = ["ip", "netns", "exec", net.client_ns, *argv]
    lo, hi = map(int, subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout.split())
    assert len(tw_truth) >= 2900
    assert counts[dest] == (len(tw_truth), hi - lo + 1)


# --- nginx keep-alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_nginx_idle_keepalive(leak_tracer: Any, leak_net: LeakNet, spawn: Any, nginx: Any) -> None:
    net = leak_net
    ng = nginx(net.server_host, net.server_ns, keepalive=600)
    port = ng.port
    cli = spawn(client_argv("keepalive", net.server_host, port, "--http", "--idle", 3, "--chatty", 3, "--every", 0.3),
                net.client_ns, "client")
    cli.expect("ready")
    conns = [e for e in cli.events if e.get("event") == "conn"]
    idle_ports = {e["lport"] for e in conns if e["kind"] == "idle"}
    chatty_ports = {e["lport"] for e in conns if e["kind"] == "chatty"}
    time.sleep(3.0)
    rep = Scanner(leak_tracer, Thresholds(idle_after=2.0), pids=ng.worker_pids()).scan()
    server_rows = [r for r in ss(net.server_ns, port) if r.state == "ESTAB" and r.lport == port]
    assert len(server_rows) == 6
    idle_truth = {r.cookie: r for r in server_rows if min(r.ms("lastsnd") or 0, r.ms("lastrcv") or 0) >= 2000}
    assert {r.rport for r in idle_truth.values()} == idle_ports
    got = {c: f for c, f in ours(rep, "idle_established", port, {net.netns_ino(net.server_ns)}).items()
           if f.lport == port}
    assert set(got) == set(idle_truth)
    workers = set(ng.worker_pids())
    for cookie, r in idle_truth.items():
        f = got[cookie]
        assert (f.pid, f.fd) == held_by(r)
        assert f.pid in workers and f.comm == "nginx"
        assert f.rport in idle_ports and f.rport not in chatty_ports
        assert f.idle_seconds >= 2.0


# --- growth -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("leak_net", NETS, indirect=True)
def test_close_wait_growth_flagged_before_fd_limit(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    limit = 64
    srv = spawn(server_argv("hold", net.server_host, "--nofile", limit), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    spawn(client_argv("trickle", net.server_host, port, "--count", 100, "--every", 1.0), net.client_ns, "trickle")
    scanner = Scanner(leak_tracer, Thresholds())
    flag = None
    for _ in range(30):  # one poll a second; the leak needs ~60 s to hit the limit
        before = [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT" and r.users]
        rep = scanner.scan()
        after = [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT" and r.users]
        flag = next((f for f in rep.flags if f.kind == "close_wait_growth" and f.pid == srv.pid), None)
        if flag is not None:
            break
        time.sleep(1.0)
    assert flag is not None, "no close_wait_growth flag within 30 polls"
    open_fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
    assert open_fds < limit * 0.5, "flagged too late"
    assert not [e for e in srv.collect() if e.get("event") == "emfile"]
    assert len(before) <= flag.extra["close_wait"] <= len(after)
    assert all(held_by(r)[0] == srv.pid for r in after)
    assert flag.extra["per_second"] > 0.5
    assert 0 < flag.extra["seconds_to_fd_limit"] < 120
    assert rep.processes[srv.pid].max_fds == limit
    assert not [f for f in rep.flags if f.kind == "fd_exhaustion" and f.pid == srv.pid]


# --- fd exhaustion, TIME_WAIT pressure, LAST_ACK --------------------------------------------------------------


@pytest.mark.parametrize("leak_net", ["loopback4"], indirect=True)
def test_fd_exhaustion(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host, "--nofile", 40), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    spawn(client_argv("hangup", net.server_host, port, 30, "--hold"), net.client_ns, "client").expect("connected")
    wait_until(lambda: len([e for e in srv.collect() if e.get("event") == "accepted"]) == 30, 10, "30 accepts")
    rep = scan(leak_tracer)
    open_fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
    with open(f"/proc/{srv.pid}/limits") as f:
        soft = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
    (flag,) = [f for f in rep.flags if f.kind == "fd_exhaustion" and f.pid == srv.pid]
    assert (flag.extra["open_fds"], flag.extra["max_fds"]) == (open_fds, soft) == (open_fds, 40)
    assert open_fds >= 32
    assert "Too many open files" in flag.detail


@pytest.mark.parametrize("leak_net", ["veth4"], indirect=True)
def test_time_wait_pressure(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    subprocess.run(["ip", "netns", "exec", str(net.client_ns), "sysctl", "-qw",
                    "net.ipv4.ip_local_port_range=40000 40099"], check=True, timeout=20)
    srv = spawn(server_argv("serve", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    spawn(client_argv("storm", net.server_host, port, 70), net.client_ns, "storm").expect("done", timeout=60)
    rep = scan(leak_tracer, top=100000)
    truth = [r for r in ss(net.client_ns, port) if r.state == "TIME-WAIT"]
    assert len(truth) == 70
    ns = net.netns_ino(net.client_ns)
    (flag,) = [f for f in rep.flags if f.kind == "time_wait_pressure" and f.netns == ns]
    assert (flag.raddr, flag.rport) == (net.server_host, port)
    assert flag.extra["time_wait"] == len(truth) and flag.extra["range_size"] == 100
    assert (f"{net.server_host}:{port}@netns:{ns}", 70, 100) in rep.time_wait
    # Under the threshold: not flagged.
    rep = scan(leak_tracer, time_wait_warn_ratio=0.9)
    assert not [f for f in rep.flags if f.kind == "time_wait_pressure" and f.netns == ns]


@pytest.mark.parametrize("leak_net", ["veth4"], indirect=True)
def test_last_ack_stuck(leak_tracer: Any, leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    spawn(client_argv("hangup", net.server_host, port, 2), net.client_ns, "client").expect("closed")
    wait_until(lambda: len([r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT"]) == 2, 10, "CLOSE-WAIT")
    # The peer vanishes, then the server finally closes: its FINs go unanswered.
    dev = next(line.split(":")[1].strip().split("@")[0] for line in subprocess.run(
        ["ip", "-n", str(net.client_ns), "-o", "link", "show", "type", "veth"], capture_output=True, text=True,
        timeout=20, check=True).stdout.splitlines())
    subprocess.run(["ip", "-n", str(net.client_ns), "link", "set", dev, "down"], check=True, timeout=20)
    srv.send("close")
    t_close = srv.expect("closed_all")["t"]
    rows = wait_until(lambda: [r for r in ss(net.server_ns, port) if r.state == "LAST-ACK"] or None, 10, "LAST-ACK")
    time.sleep(2.0)
    rep = scan(leak_tracer, last_ack_after=1.5)
    got = ours(rep, "last_ack_stuck", port, {net.netns_ino(net.server_ns)})
    assert set(got) == {r.cookie for r in rows} and len(got) == 2
    for f in got.values():
        assert not f.at_least and 1.5 <= f.seconds <= time.monotonic() - t_close + 0.05
        assert f.pid is None and f.inode is None  # closed: no file, no process


# --- the command line ------------------------------------------------------------------------------------------


def _tracer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([PYTHON, "-m", "pytracer", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("leak_net", ["veth4"], indirect=True)
def test_tracer_leaks_and_watch_cli(leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    clean = spawn(server_argv("serve", net.server_host), net.server_ns, "clean")
    clean.expect("listening")
    leaky = spawn(server_argv("hold", net.server_host), net.server_ns, "leaky")
    port = leaky.expect("listening")["port"]
    spawn(client_argv("hangup", net.server_host, port, 2), net.client_ns, "client").expect("closed")
    rows = wait_until(lambda: [r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT" and r.users]
                      if len([r for r in ss(net.server_ns, port) if r.state == "CLOSE-WAIT"]) == 2 else None,
                      10, "CLOSE-WAIT")
    time.sleep(1.2)

    ok = _tracer("leaks", "--pid", str(clean.pid), "--close-wait-after", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "nothing flagged" in ok.stdout

    bad = _tracer("leaks", "--pid", str(leaky.pid), "--close-wait-after", "1", "--json")
    assert bad.returncode == 1, bad.stderr
    out = json.loads(bad.stdout)
    flagged = {(f["cookie"], f["pid"], f["fd"]) for f in out["flags"] if f["kind"] == "close_wait"}
    assert flagged == {(r.cookie, *held_by(r)) for r in rows}
    assert out["seed"]["seeded"] >= 3

    text = _tracer("leaks", "--pid", str(leaky.pid), "--close-wait-after", "1")
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    for r in rows:
        pid, fd = held_by(r)
        comm = min(r.users, key=lambda u: (u[1], u[2]))[0]
        assert any(line.split()[:4] == ["close_wait", str(pid), comm, str(fd)] and f":{r.rport}" in line
                   for line in lines), text.stdout

    bad_arg = _tracer("leaks", "--close-wait-after", "-3")
    assert bad_arg.returncode == 2 and "close-wait-after" in bad_arg.stderr
    no_pid = _tracer("leaks", "--pid", "999999999")
    assert no_pid.returncode == 2
    assert [line for line in no_pid.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: Invalid value for --pid: no process with pid 999999999"]

    watch = _tracer("watch", "--json", "--duration", "2", "--close-wait-after", "1", "--pid", str(leaky.pid))
    assert watch.returncode == 0, watch.stderr
    lines = [json.loads(line) for line in watch.stdout.splitlines()]
    assert len(lines) == 2
    for line in lines:
        cw = {f["cookie"]: f for f in line["flags"] if f["kind"] == "close_wait"}
        assert set(cw) == {r.cookie for r in rows}
        for r in rows:
            f = cw[r.cookie]
            assert {"kind", "cookie", "pid", "comm", "fd", "state", "seconds", "detail"} <= set(f)
            assert (f["pid"], f["fd"]) == held_by(r) and f["state"] == "CLOSE_WAIT" and f["seconds"] >= 1.0
        assert line["tracer"]["seeded"] >= 3


# --- records of sockets that no longer exist ----------------------------------------------


def test_gone_socket_record_is_reaped(leak_tracer: Any) -> None:
    """A record whose socket sock_diag no longer lists (its transition to
    CLOSE never reached us) is deleted after two scans ``reap_after`` apart
    and counted; live sockets' records, CLOSE records (unhashed sockets are
    not listed), records in namespaces not dumped and records that changed
    in between are kept."""
    import struct

    if leak_tracer.key_by_ptr:
        pytest.skip("this attach mode keys records by pointer: sock_diag cannot name them, so nothing is reaped")
    lsn, cli, acc, port = loopback_pair(4)
    socks = leak_tracer.map("socks")
    try:
        live = wait_until(lambda: [r for r in ss(None, port) if r.state == "ESTAB" and r.lport == port and r.cookie]
                          or None, 10, "the accepted socket in ss")
        template = wait_until(lambda: reads.lookup_record(leak_tracer, live[0].cookie), 5, "its table record")
        assert int(template["state"]) == 1  # ESTABLISHED
        old_ns = time.monotonic_ns() - 5_000_000_000
        base = (1 << 62) + (os.getpid() << 20)  # far beyond any cookie this boot will hand out
        fakes = {"gone": base + 1, "close": base + 2, "other_netns": base + 3, "changed": base + 4}
        for name, cookie in fakes.items():
            rec = template.copy()
            rec["state_ns"] = old_ns
            if name == "close":
                rec["state"] = 7  # TCP_CLOSE
            if name == "other_netns":
                rec["netns_ino"] = 1  # no namespace has inode 1
            socks.update(struct.pack("=Q", cookie), rec.tobytes(), 1)  # BPF_NOEXIST
        scanner = Scanner(leak_tracer, Thresholds(), reap_after=0.5)
        first = scanner.scan()
        assert not [e for e in first.errors if "scan:" in e], first.errors
        assert all(socks.lookup(struct.pack("=Q", c), reads.SOCK_DTYPE.itemsize) for c in fakes.values()), \
            "reaped on the first sighting"
        before = scanner.reaped
        changed = template.copy()
        changed["state_ns"] = old_ns + 1
        socks.update(struct.pack("=Q", fakes["changed"]), changed.tobytes(), 2)  # BPF_EXIST
        time.sleep(0.7)
        second = scanner.scan()
        present = {n: socks.lookup(struct.pack("=Q", c), reads.SOCK_DTYPE.itemsize) is not None
                   for n, c in fakes.items()}
        assert present == {"gone": False, "close": True, "other_netns": True, "changed": True}, present
        assert scanner.reaped - before >= 1 and second.stats["records_reaped"] == scanner.reaped
        # The live socket (ss lists it) keeps its record.
        assert reads.lookup_record(leak_tracer, live[0].cookie) is not None
        assert any(r.cookie == live[0].cookie for r in ss(None, port))
    finally:
        for cookie in (1 << 62) + (os.getpid() << 20) + np.arange(1, 5):
            socks.delete(struct.pack("=Q", int(cookie)))
        for s in (cli, acc, lsn):
            s.close()
