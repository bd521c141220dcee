"""``tracer destroy`` against real servers in network namespaces of their own.

Every scenario runs in a server and a client namespace joined by veth (so
every socket ended lives in a namespace other than the tracer's), and is
checked against ``ss`` run in those namespaces and against the test's own
clients and servers: which sockets exist before and after (by cookie),
which processes still hold fds, whether nginx still answers.  Selections are
scoped to the scenario's own pids or port: other tests share this host.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from typing import Any

import pytest

from .conftest import tracer_cmd
from .leaky_support import LeakNet, SsRow, client_argv, server_argv, ss, wait_until

pytest_plugins = ["tests.kernel.conftest_leaks"]
pytestmark = pytest.mark.kernel

VETH = ["veth4"]
COOKIE = re.compile(r"cookie=(0x[0-9a-f]+)")


def destroy(*args: Any) -> subprocess.CompletedProcess:
    return subprocess.run([*tracer_cmd(), "destroy", *map(str, args)], capture_output=True, text=True, timeout=60)


def act(*args: Any) -> subprocess.CompletedProcess:
    """``tracer destroy ... --yes``.  On a kernel without CONFIG_INET_DIAG_DESTROY
    it must say so in one line and exit 2, having ended nothing: that is
    checked, and the rest of the scenario skipped."""
    from pytracer.inventory.destroy import probe

    res = destroy(*args, "--yes")
    if probe() == errno.EOPNOTSUPP:
        assert res.returncode == 2, res.stdout + res.stderr
        assert "CONFIG_INET_DIAG_DESTROY" in res.stderr.strip().splitlines()[-1]
        assert "ended" not in res.stderr
        pytest.skip("this kernel has no CONFIG_INET_DIAG_DESTROY: its one-line refusal was checked instead")
    return res


def cookies_in(text: str, prefix: str) -> set[int]:
    """Cookies of the lines starting with ``prefix`` ("would end", "ended")."""
    return {int(m.group(1), 16) for line in text.splitlines() if line.startswith(prefix)
            for m in [COOKIE.search(line)] if m}


def by_state(rows: list[SsRow], state: str, port: int) -> dict[int, SsRow]:
    return {r.cookie: r for r in rows if r.state == state and port in (r.lport, r.rport) and r.cookie}


def http_ok(net: LeakNet, spawn: Any, port: int) -> None:
    """A new connection to nginx gets a full answer."""
    cli = spawn(client_argv("storm", net.server_host, port, 2, "--http", "--lifetime", 5), net.client_ns, "fresh")
    assert cli.expect("done", timeout=15)["count"] == 2


@pytest.mark.parametrize("leak_net", VETH, indirect=True)
def test_nginx_idle_keepalives_ended_busy_untouched(leak_net: LeakNet, spawn: Any, nginx: Any) -> None:
    net = leak_net
    ng = nginx(net.server_host, net.server_ns, keepalive=600)
    port = ng.port
    cli = spawn(client_argv("keepalive", net.server_host, port, "--http", "--idle", 3, "--chatty", 3,
                            "--every", 0.3, "--lifetime", 60), net.client_ns, "client")
    cli.expect("ready")
    conns = [e for e in cli.events if e.get("event") == "conn"]
    idle_ports = {e["lport"] for e in conns if e["kind"] == "idle"}
    chatty_ports = {e["lport"] for e in conns if e["kind"] == "chatty"}

    def idle_for_2s() -> dict[int, SsRow] | None:
        rows = [r for r in ss(net.server_ns, port) if r.state == "ESTAB" and r.lport == port]
        idle = {r.cookie: r for r in rows if min(r.ms("lastsnd") or 0, r.ms("lastrcv") or 0) >= 2500}
        return idle if len(rows) == 6 and len(idle) == 3 else None

    idle = wait_until(idle_for_2s, 10, "3 of 6 nginx connections idle for 2.5 s")
    assert {r.rport for r in idle.values()} == idle_ports
    listener = by_state(ss(net.server_ns, port), "LISTEN", port)
    workers = [str(p) for p in ng.worker_pids()]
    scope = [a for p in workers for a in ("--pid", p)]

    # The dry run lists exactly the idle server ends, and changes nothing.
    before = {(r.cookie, r.state) for r in ss(net.server_ns, port)}
    dry = destroy("--kind", "idle_established", "--idle-after", 2, *scope)
    assert dry.returncode == 0, dry.stderr
    assert cookies_in(dry.stdout, "would end") == set(idle), dry.stdout
    assert "nothing was ended" in dry.stdout
    for line in dry.stdout.splitlines():
        if line.startswith("would end"):
            r = idle[int(COOKIE.search(line).group(1), 16)]  # type: ignore[union-attr]
            comm, pid, fd = r.users[0]
            assert f"tcp {net.server_host}:{port} {r.raddr}:{r.rport} ESTABLISHED pid={pid} comm=nginx fd={fd} " \
                   "idle=" in line
    assert {(r.cookie, r.state) for r in ss(net.server_ns, port)} == before

    done = act("--kind", "idle_established", "--idle-after", 2, *scope)
    assert done.returncode == 0, done.stderr
    assert cookies_in(done.stderr, "ended") == set(idle), done.stderr
    assert "ended 3, skipped 0" in done.stdout

    after = ss(net.server_ns, port)
    estab = by_state(after, "ESTAB", port)
    assert not set(idle) & {r.cookie for r in after}, "ended sockets still listed by ss"
    assert {r.rport for r in estab.values()} == chatty_ports  # the busy ones: untouched
    assert by_state(after, "LISTEN", port).keys() == listener.keys()  # the listener too
    http_ok(net, spawn, port)
    # The busy client kept talking on its connections throughout.
    assert cli.p.poll() is None


@pytest.mark.parametrize("leak_net", VETH, indirect=True)
def test_fin_wait2_orphans_and_held_close_wait(leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host, "--lifetime", 60), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    cli = spawn(client_argv("hangup", net.server_host, port, 4, "--lifetime", 60), net.client_ns, "client")
    cli.expect("closed")

    def settled() -> tuple[dict[int, SsRow], dict[int, SsRow]] | None:
        fw2 = by_state(ss(net.client_ns, port), "FIN-WAIT-2", port)
        cw = by_state(ss(net.server_ns, port), "CLOSE-WAIT", port)
        return (fw2, cw) if len(fw2) == 4 and len(cw) == 4 and all(r.users for r in cw.values()) else None

    fw2, cw = wait_until(settled, 10, "4 FIN-WAIT-2 orphans and 4 CLOSE-WAIT held by the server")
    assert all(not r.users and r.ino == 0 for r in fw2.values())  # orphans: no file, no process
    wait_until(lambda: all((r.ms("lastack") or 0) >= 1500 for r in by_state(ss(net.server_ns, port), "CLOSE-WAIT",
                                                                           port).values()), 10, "1.5 s in CLOSE-WAIT")

    # FIN_WAIT2 orphans in the client's namespace, by port.
    res = act("--kind", "fin_wait2_orphan", "--fin-wait2-after", 1, "--port", port)
    assert res.returncode == 0, res.stderr
    assert cookies_in(res.stderr, "ended") == set(fw2), res.stderr + res.stdout
    assert not by_state(ss(net.client_ns, port), "FIN-WAIT-2", port)

    # CLOSE_WAIT held by the server's fds, at most 3 of the 4 (--max), by pid.
    fds_before = set(os.listdir(f"/proc/{srv.pid}/fd"))
    res = act("--kind", "close_wait", "--close-wait-after", 1, "--pid", srv.pid, "--max", 3)
    assert res.returncode == 0, res.stderr
    ended = cookies_in(res.stderr, "ended")
    assert len(ended) == 3 and ended < set(cw), res.stderr
    assert "4 sockets match, the oldest 3 taken (--max)" in res.stdout
    assert "not the application's leaked file descriptor" in res.stdout
    left = by_state(ss(net.server_ns, port), "CLOSE-WAIT", port)
    assert set(left) == set(cw) - ended
    # The port and connection are freed, the leaked fds are not (the report says so).
    assert set(os.listdir(f"/proc/{srv.pid}/fd")) == fds_before
    assert by_state(ss(net.server_ns, port), "LISTEN", port)


@pytest.mark.parametrize("leak_net", VETH, indirect=True)
def test_backlog_close_wait_ended_listener_kept(leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("noaccept", net.server_host, "--backlog", 16, "--lifetime", 60), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    spawn(client_argv("hangup", net.server_host, port, 3, "--lifetime", 60), net.client_ns, "client").expect("closed")
    cw = wait_until(lambda: (lambda d: d if len(d) == 3 else None)(by_state(ss(net.server_ns, port), "CLOSE-WAIT",
                                                                            port)), 10, "3 CLOSE-WAIT in the backlog")
    assert all(r.ino == 0 and not r.users for r in cw.values())  # never accepted
    listener = by_state(ss(net.server_ns, port), "LISTEN", port)
    wait_until(lambda: all((r.ms("lastack") or 0) >= 1500 for r in by_state(ss(net.server_ns, port), "CLOSE-WAIT",
                                                                           port).values()), 10, "1.5 s in CLOSE-WAIT")

    dry = destroy("--kind", "close_wait", "--close-wait-after", 1, "--pid", srv.pid)
    assert cookies_in(dry.stdout, "would end") == set(cw), dry.stdout
    # `tracer leaks` with the same thresholds flags the same sockets.
    leaks = subprocess.run([*tracer_cmd(), "leaks", "--json", "--close-wait-after", "1", "--pid", str(srv.pid)],
                           capture_output=True, text=True, timeout=120)
    assert leaks.returncode == 1, leaks.stderr
    flagged = {f["cookie"] for f in json.loads(leaks.stdout)["flags"] if f["kind"] == "close_wait"}
    assert flagged == set(cw)
    assert "unaccepted" in dry.stdout and "fd=-" in dry.stdout
    # --state LISTEN is refused outright; a listener is never chosen.
    bad = destroy("--state", "LISTEN", "--port", port, "--yes")
    assert bad.returncode == 2 and "listeners are never ended" in bad.stderr
    res = act("--state", "CLOSE_WAIT", "--pid", srv.pid)
    assert res.returncode == 0, res.stderr
    assert cookies_in(res.stderr, "ended") == set(cw), res.stderr + res.stdout
    after = ss(net.server_ns, port)
    assert not by_state(after, "CLOSE-WAIT", port)
    assert by_state(after, "LISTEN", port).keys() == listener.keys()


@pytest.mark.parametrize("leak_net", VETH, indirect=True)
def test_refusals_change_nothing(leak_net: LeakNet, spawn: Any) -> None:
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host, "--lifetime", 60), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    spawn(client_argv("hangup", net.server_host, port, 2, "--lifetime", 60), net.client_ns, "client").expect("closed")
    cw = wait_until(lambda: (lambda d: d if len(d) == 2 else None)(by_state(ss(net.server_ns, port), "CLOSE-WAIT",
                                                                            port)), 10, "2 CLOSE-WAIT")

    # No filter: no --pid, no --port, the kind's threshold left at its default.
    res = destroy("--kind", "close_wait", "--yes")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "refusing to end sockets without a filter" in res.stderr
    # Without CAP_NET_ADMIN: one line, exit 2, nothing ended.
    res = subprocess.run(["setpriv", "--bounding-set", "-net_admin", "--", *tracer_cmd(), "destroy", "--kind",
                          "close_wait", "--close-wait-after", "0", "--pid", str(srv.pid), "--yes"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "CAP_NET_ADMIN" in res.stderr.splitlines()[-1]
    assert by_state(ss(net.server_ns, port), "CLOSE-WAIT", port).keys() == cw.keys()


@pytest.mark.parametrize("leak_net", VETH, indirect=True)
def test_via_bpf_sock_destroy(leak_net: LeakNet, spawn: Any) -> None:
    """bpf_sock_destroy() from iter/tcp (v6.5+): idle connections ended, busy
    ones not; a FIN_WAIT2 minisocket cannot be ended that way, and says so.
    Before v6.5: one line, exit 2, nothing ended."""
    net = leak_net
    srv = spawn(server_argv("hold", net.server_host, "--lifetime", 60), net.server_ns, "server")
    port = srv.expect("listening")["port"]
    cli = spawn(client_argv("keepalive", net.server_host, port, "--idle", 2, "--chatty", 2, "--every", 0.2,
                            "--lifetime", 60), net.client_ns, "client")
    cli.expect("ready")
    conns = [e for e in cli.events if e.get("event") == "conn"]
    chatty_ports = {e["lport"] for e in conns if e["kind"] == "chatty"}

    def idle_now() -> dict[int, SsRow] | None:
        rows = by_state(ss(net.server_ns, port), "ESTAB", port)
        idle = {c: r for c, r in rows.items() if min(r.ms("lastsnd") or 0, r.ms("lastrcv") or 0) >= 2000}
        return idle if len(rows) == 4 and len(idle) == 2 else None

    idle = wait_until(idle_now, 10, "2 of 4 connections idle for 2 s")
    res = destroy("--kind", "idle_established", "--idle-after", 1.5, "--pid", srv.pid, "--via", "bpf", "--yes")
    if res.returncode == 2 and "bpf_sock_destroy" in res.stderr:
        assert res.stderr.strip().count("\n") == 0 and "use --via sock_diag" in res.stderr
        assert by_state(ss(net.server_ns, port), "ESTAB", port).keys() >= idle.keys()
        pytest.skip(f"no bpf_sock_destroy() here ({os.uname().release}): its one-line refusal was checked")
    assert res.returncode == 0, res.stdout + res.stderr
    assert cookies_in(res.stderr, "ended") == set(idle)
    estab = by_state(ss(net.server_ns, port), "ESTAB", port)
    assert not set(idle) & set(estab)
    assert {r.rport for r in estab.values()} == chatty_ports
    assert by_state(ss(net.server_ns, port), "LISTEN", port)

    # FIN_WAIT2 orphans are timewait minisockets: the kfunc refuses them, the run says so and exits 1.
    hang = spawn(client_argv("hangup", net.server_host, port, 2, "--lifetime", 60), net.client_ns, "hangup")
    hang.expect("closed")
    fw2 = wait_until(lambda: (lambda d: d if len(d) == 2 else None)(by_state(ss(net.client_ns, port), "FIN-WAIT-2",
                                                                             port)), 10, "2 FIN-WAIT-2 orphans")
    res = destroy("--kind", "fin_wait2_orphan", "--fin-wait2-after", 0, "--port", port,
                  "--via", "bpf", "--yes")
    assert res.returncode == 1, res.stdout + res.stderr
    assert cookies_in(res.stderr, "failed") == set(fw2) and "minisocket" in res.stderr
    assert by_state(ss(net.client_ns, port), "FIN-WAIT-2", port).keys() == fw2.keys()
