"""Support for the leak detection tests: helper processes, namespaces, and
ground truth from ``ss``.  Plain functions and classes; the fixtures that use
them live in conftest_leaks.py.

* :class:`Helper`: a subprocess (leaky_server.py, leaky_client.py, nginx)
  printing JSON lines, optionally inside a network namespace.
* :class:`LeakNet`: where a scenario runs: loopback in the host namespace, or
  a server namespace and a client namespace joined by a veth pair.
* :func:`ss`: ground truth, parsed from ``ss -tanpie -i`` (one line per socket
  with -O), run in the namespace in question.  ``sk:`` is the socket cookie.

Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
SERVER = HERE / "leaky_server.py"
CLIENT = HERE / "leaky_client.py"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tier needs root")


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --- helper processes ------------------------------------------------------------


class Helper:
    """A subprocess printing JSON lines; ``expect`` waits for one event."""

    def __init__(self, argv: list[str], netns: str | None, name: str) -> None:
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.name = name
        self.netns = netns
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, bufsize=1)
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.q.put(json.loads(line))
        self.q.put(None)

    @property
    def pid(self) -> int:
        return self.p.pid  # `ip netns exec` execs in place: same pid

    def expect(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {event!r} within {timeout}s")
            try:
                msg = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                err = self.p.stderr.read() if self.p.stderr and self.p.poll() is not None else ""
                raise AssertionError(f"{self.name} exited before {event!r}: {err[-2000:]}")
            self.events.append(msg)
            if msg.get("event") == event:
                return msg

    def collect(self) -> list[dict[str, Any]]:
        """Every event received so far, without waiting."""
        while True:
            try:
                msg = self.q.get_nowait()
            except queue.Empty:
                return self.events
            if msg is None:
                return self.events
            self.events.append(msg)

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def server_argv(mode: str, host: str, *extra: Any) -> list[Any]:
    return [PYTHON, SERVER, mode, host, *extra]


def client_argv(mode: str, host: str, port: int, *extra: Any) -> list[Any]:
    return [PYTHON, CLIENT, mode, host, port, *extra]


# --- where a scenario runs ----------------------------------------------------------


@dataclass
class LeakNet:
    kind: str  # "loopback" or "veth"
    family: int  # 4 or 6
    server_ns: str | None
    client_ns: str | None
    server_host: str  # the server listens here; clients connect here
    created: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.family}"

    def netns_ino(self, ns: str | None) -> int:
        return os.stat(f"/var/run/netns/{ns}" if ns else "/proc/self/ns/net").st_ino


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


# --- ground truth: ss ---------------------------------------------------------------------


@dataclass
class SsRow:
    state: str  # as ss prints it: ESTAB, CLOSE-WAIT, ...
    recv_q: int
    send_q: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    users: list[tuple[str, int, int]]  # (comm, pid, fd)
    ino: int
    cookie: int | None
    timer: str | None
    info: dict[str, str]

    def ms(self, key: str) -> int | None:
        v = self.info.get(key)
        return int(v) if v is not None and v.isdigit() else None


_USERS = re.compile(r'\("([^"]*)",pid=(\d+),fd=(\d+)\)')


def _split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return host, int(port) if port.isdigit() else 0


def parse_ss(text: str) -> list[SsRow]:
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] == "State":
            continue
        laddr, lport = _split_endpoint(parts[3])
        raddr, rport = _split_endpoint(parts[4])
        info: dict[str, str] = {}
        timer = None
        for tok in parts[5:]:
            if tok.startswith("timer:("):
                timer = tok[len("timer:("):].rstrip(")")
            elif ":" in tok and not tok.startswith("users:"):
                k, _, v = tok.partition(":")
                info.setdefault(k, v)
        sk = info.get("sk")
        rows.append(SsRow(
            state=parts[0], recv_q=int(parts[1]), send_q=int(parts[2]), laddr=laddr, lport=lport, raddr=raddr,
            rport=rport, users=[(c, int(p), int(f)) for c, p, f in _USERS.findall(line)],
            ino=int(info.get("ino", "0") or 0), cookie=int(sk, 16) if sk else None, timer=timer, info=info,
        ))
    return rows


def loopback_pair(backlog: int = 8) -> tuple[socket.socket, socket.socket, socket.socket, int]:
    """A listener on 127.0.0.1 and one connection to it, accepted:
    (listener, client, accepted, port).  The caller closes all three."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(backlog)
    port = lsn.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = lsn.accept()
    return lsn, cli, acc, port


def ss(netns: str | None = None, port: int | None = None) -> list[SsRow]:
    """Every TCP socket (of ``port``, as source or destination), per ss."""
    argv = ["ss", "-tanpieiOH"]
    if port is not None:
        argv.append(f"( sport = :{port} or dport = :{port} )")
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return parse_ss(out.stdout)


# --- the tracer --------------------------------------------------------------------------------


# --- nginx --------------------------------------------------------------------------------------


# Format with prefix, keepalive (seconds; 0: none), listen (nginx's listen
# arguments, e.g. "127.0.0.1:8080 backlog=4096") and connections.
NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout {keepalive}s;
    keepalive_requests 100000;
    server {{
        listen {listen};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass
class Nginx:
    master: Helper
    port: int
    prefix: str

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.master.pid)], capture_output=True, text=True, timeout=10)
        return [int(x) for x in out.stdout.split()]


