"""Idle before end against a real middlebox: three namespaces, conntrack, nftables.

client ns --veth-- router ns --veth-- server ns.  The router forwards with
conntrack, whose established timeout the test sets to T, and answers any
packet of a flow it has forgotten with a TCP reset (nftables), as a NAT or
a stateful firewall does.  A pooled client that leaves connections idle
longer than T gets a reset on its next request.

Ground truth is the test's own: T is the sysctl it wrote, and the client
counts the requests that failed.  The tracer (``tracer watch --json`` with
the leak rules, on the whole host) must put T within one histogram bucket
and count exactly those resets, and a pool that idles below T must not be
flagged.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from pytracer.kernel.histogram import slot_of

from .conftest import HERE, IN_VM, PYTHON, Proc, tracer_cmd

T_S = 3  # the router's conntrack established timeout
POOL = 5  # connections per client
START_S = 600 if IN_VM else 60


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=20)


@dataclass
class Middlebox:
    client: str
    router: str
    server: str
    server_ip: str
    created: list[str] = field(default_factory=list)


NFT_RULES = """
table inet middlebox {
  chain forward {
    type filter hook forward priority 0; policy accept;
    ct state invalid meta l4proto tcp reject with tcp reset
    ct state new tcp flags != syn reject with tcp reset
  }
}
"""


@pytest.fixture(scope="module")
def middlebox() -> Iterator[Middlebox]:
    if not shutil.which("nft"):
        pytest.fail("nft (nftables) is not installed: run scripts/install-deps")
    tag = f"{os.getpid() % 10000}{random.randint(10, 99)}"
    n = random.randint(1, 250)
    mb = Middlebox(f"pti{tag}c", f"pti{tag}r", f"pti{tag}s", f"10.{n}.92.2")
    try:
        for ns in (mb.client, mb.router, mb.server):
            _run("ip", "netns", "add", ns)
            mb.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        for side, ns, net in (("c", mb.client, f"10.{n}.91"), ("s", mb.server, f"10.{n}.92")):
            dev, rdev = f"vi{tag}{side}", f"vr{tag}{side}"
            _run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", rdev, "netns", mb.router)
            _run("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
            _run("ip", "-n", mb.router, "addr", "add", f"{net}.1/24", "dev", rdev)
            _run("ip", "-n", mb.router, "link", "set", rdev, "up")
        _run("ip", "netns", "exec", mb.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        subprocess.run(["ip", "netns", "exec", mb.router, "nft", "-f", "-"], input=NFT_RULES, check=True,
                       capture_output=True, text=True, timeout=20)
        # The rules above bring conntrack into the namespace; then its sysctls exist.
        _run("ip", "netns", "exec", mb.router, "sysctl", "-qw",
             f"net.netfilter.nf_conntrack_tcp_timeout_established={T_S}", "net.netfilter.nf_conntrack_tcp_loose=0")
        yield mb
    finally:
        for ns in mb.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


class Watch:
    """`tracer watch --json` on the whole host, its reports in a queue."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([*tracer_cmd(), "watch", "--json", "--interval", "0.5", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        first: list[str] = []
        t = threading.Thread(target=lambda: first.append(self.p.stderr.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(START_S)
        if not first or not first[0].startswith("tracer: attached"):
            self.stop()
            pytest.fail(f"tracer watch did not attach within {START_S}s: {first}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self.reports.put(json.loads(line))

    def report_after(self, t_wall: float, ok: Callable[[dict[str, Any]], bool], timeout: float = 15.0
                     ) -> dict[str, Any]:
        """The first report taken after t_wall for which ok() holds (the last
        one taken after t_wall if none does within timeout)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                r = self.reports.get(timeout=1.0)
            except queue.Empty:
                continue
            if r["ts"] < t_wall:
                continue
            last = r
            if ok(r):
                return r
        assert last is not None, "tracer watch sent no report"
        return last

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()


PORT_RESET = 18000 + random.randint(0, 999)
PORT_SAFE = PORT_RESET + 1000


@pytest.fixture(scope="module")
def setup(middlebox: Middlebox) -> Iterator[tuple[Middlebox, Watch, list[Proc]]]:
    servers = []
    for port in (PORT_RESET, PORT_SAFE):
        s = Proc(["ip", "netns", "exec", middlebox.server, PYTHON, str(HERE / "idle_pool.py"), "server",
                  str(port)], name=f"server{port}")
        s.expect("listening")
        servers.append(s)
    w = Watch("--service-ports", f"client:{PORT_RESET},client:{PORT_SAFE},server:{PORT_RESET}")
    try:
        yield middlebox, w, servers
    finally:
        w.stop()
        for s in servers:
            s.kill()


def pool(mb: Middlebox, port: int, *idles: float) -> tuple[dict[str, Any], int, float]:
    """Run the pooled client; its result line, its pid, and the wall time it ended."""
    c = Proc(["ip", "netns", "exec", mb.client, PYTHON, str(HERE / "idle_pool.py"), "client", mb.server_ip,
              str(port), str(POOL), *map(str, idles)], name="client")
    try:
        done = c.expect("done", timeout=60)
        return done, c.pid, time.time()
    finally:
        c.kill()


def flags_for(report: dict[str, Any], port: int) -> list[dict[str, Any]]:
    return [f for f in report.get("flags") or []
            if f["kind"] == "idle_reset" and f["extra"]["service"] == str(port)]


def service(report: dict[str, Any], port: int, role: str) -> dict[str, Any] | None:
    return next((s for s in report.get("services") or [] if s["service"] == str(port) and s["role"] == role), None)


def test_resets_after_the_middlebox_timeout_are_flagged(setup: Any) -> None:
    mb, w, _ = setup
    # One round at 1 s idle (below T: all succeed), then one at T + 0.4 s.
    done, pid, t_end = pool(mb, PORT_RESET, 1.0, T_S + 0.4)
    assert done["failed"] == POOL, done  # the middlebox reset every connection idle past T
    rep = w.report_after(t_end, lambda r: bool(flags_for(r, PORT_RESET)))
    got = flags_for(rep, PORT_RESET)
    assert got, f"no idle_reset flag for port {PORT_RESET}: {rep.get('flags')} {rep.get('services')}"
    f = got[0]
    assert f["extra"]["role"] == "client"
    # T within one histogram bucket of the router's own timeout.
    assert abs(slot_of(int(f["extra"]["t_seconds"] * 1e6)) - slot_of(T_S * 1_000_000)) <= 1, f
    # The reset count exactly: the client's own count of failed requests.
    assert f["extra"]["resets"] == done["failed"], (f, done)
    assert f["extra"]["hits"] == done["failed"]
    assert f["pid"] == pid
    assert f"below {T_S}" in f["detail"] or "Fix: set an idle timeout or TCP keepalive below" in f["detail"]
    svc = service(rep, PORT_RESET, "client")
    assert svc is not None
    assert svc["idle_before_end"]["reset_received"]["count"] == done["failed"]
    assert svc["ends"] == POOL


def test_pool_idling_below_the_timeout_is_not_flagged(setup: Any) -> None:
    mb, w, _ = setup
    done, _pid, t_end = pool(mb, PORT_SAFE, 1.0, 1.0)
    assert done["failed"] == 0, done
    # Wait for the tracer to have seen the pool's own closes, then judge.
    rep = w.report_after(t_end, lambda r: (service(r, PORT_SAFE, "client") or {}).get("ends", 0) >= POOL)
    svc = service(rep, PORT_SAFE, "client")
    assert svc is not None and svc["ends"] == POOL, rep.get("services")
    assert svc["idle_before_end"]["local_close"]["count"] == POOL
    assert "reset_received" not in svc["idle_before_end"]
    assert not flags_for(rep, PORT_SAFE), rep.get("flags")


# --- who ended it, and the idle before, on loopback ------------------------------


def _pair(ls: socket.socket, port: int) -> tuple[socket.socket, socket.socket, float]:
    """A connection with one exchange; returns it and the time of its last data."""
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = ls.accept()
    c.sendall(b"q")
    s.recv(1)
    s.sendall(b"a")
    c.recv(1)
    return c, s, time.monotonic()


def test_each_ender_and_its_idle_time_on_loopback() -> None:
    from pytracer.inventory.services import Service, Spec, assign
    from pytracer.kernel.abi import Role
    from pytracer.kernel.core import Tracer
    from pytracer.table import services

    port = PORT_SAFE + 1000
    slots = assign(Spec((Service(port, Role.SERVER), Service(port, Role.CLIENT)), auto=False))
    idle = 1.2
    truth: dict[tuple[str, str], float] = {}
    with Tracer(services=slots) as t, socket.socket() as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(8)
        conns = [_pair(ls, port) for _ in range(3)]
        time.sleep(idle)
        # The client closes; the server closes at once on EOF.
        c, s, last = conns[0]
        c.close()
        truth["client", "local_close"] = truth["server", "peer_fin"] = time.monotonic() - last
        s.recv(1)
        s.close()
        # The server closes; the client only a second later: its idle ends at the FIN.
        c, s, last = conns[1]
        s.close()
        truth["server", "local_close"] = truth["client", "peer_fin"] = time.monotonic() - last
        time.sleep(1.0)
        c.close()
        # The client aborts (RST); the server closes its reset socket half a second later.
        c, s, last = conns[2]
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        truth["client", "local_abort"] = truth["server", "reset_received"] = time.monotonic() - last
        time.sleep(0.5)
        s.close()
        time.sleep(0.3)
        got = {(st.role, e): h for st in services.read(t) if st.service == str(port) for e, h in st.idle.items()
               if h.count}
    assert set(got) == set(truth), (sorted(got), sorted(truth))
    for key, h in got.items():
        assert h.count == 1, key
        slot = next(i for i, n in enumerate(h.slots) if n)
        assert abs(slot - slot_of(int(truth[key] * 1e6))) <= 1, (key, slot, truth[key])


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): the kernel's tcp_disconnect(), the socket back to CLOSE, reusable."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    addr = struct.pack("HH12x", socket.AF_UNSPEC, 0)
    if libc.connect(sock.fileno(), addr, len(addr)) != 0:
        raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")


def test_a_reused_socket_ends_each_connection_for_its_service() -> None:
    """One client socket connected, disconnected and connected again: two connections end for the
    service (the first at the reuse, which is where the kernel sees its life end), each with its lifetime."""
    from pytracer.inventory.services import Service, Spec, assign
    from pytracer.kernel.abi import Role
    from pytracer.kernel.core import Tracer
    from pytracer.table import services

    port = PORT_SAFE + 1001
    slots = assign(Spec((Service(port, Role.CLIENT),), auto=False))
    with Tracer(services=slots) as t, socket.socket() as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(8)
        c = socket.socket()
        try:
            for _ in range(2):
                c.connect(("127.0.0.1", port))
                s, _ = ls.accept()
                c.sendall(b"q")
                s.recv(1)
                s.close()
                _disconnect(c)
            c.close()
        finally:
            c.close()
        time.sleep(0.3)
        [st] = [x for x in services.read(t) if x.service == str(port) and x.role == "client"]
    assert st.ends == 2, st
    assert st.lifetime.count == 2, st


SILENT = """
table inet silent {
  chain input {
    type filter hook input priority 0; policy drop;
  }
}
"""


def test_a_keepalive_timeout_is_a_timeout_with_its_idle_time(netns_pair: Any) -> None:
    from pytracer.inventory.services import Service, Spec, assign
    from pytracer.kernel.abi import Role
    from pytracer.kernel.core import Tracer
    from pytracer.table import services

    port = PORT_SAFE + 2000
    server = Proc([PYTHON, str(HERE / "idle_pool.py"), "server", str(port)], netns=netns_pair.b, name="server")
    client = None
    try:
        server.expect("listening")
        with Tracer(services=assign(Spec((Service(port, Role.CLIENT),), auto=False))) as t:
            client = Proc([PYTHON, str(HERE / "idle_pool.py"), "keepalive", netns_pair.b4, str(port)],
                          netns=netns_pair.a, name="client")
            client.expect("connected")
            # The server's side goes silent: nothing reaches it any more.
            subprocess.run(["ip", "netns", "exec", netns_pair.b, "nft", "-f", "-"], check=True, text=True,
                           capture_output=True, timeout=20, input=SILENT)
            client.send()
            done = client.expect("done", timeout=30)
            time.sleep(0.3)
            [st] = [s for s in services.read(t) if s.service == str(port) and s.role == "client"]
    finally:
        for p in (client, server):
            if p is not None:
                p.kill()
    assert done["error"] == "ETIMEDOUT", done
    got = {e: h for e, h in st.idle.items() if h.count}
    assert set(got) == {"timeout"} and got["timeout"].count == 1, got
    slot = next(i for i, n in enumerate(got["timeout"].slots) if n)
    assert abs(slot - slot_of(int(done["idle"] * 1e6))) <= 1, (slot, done)
