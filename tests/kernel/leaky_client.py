"""TCP clients for the leak detection tests.  JSON lines on stdout; every mode
ends by itself (--lifetime).

    python leaky_client.py hangup HOST PORT N [--hold]   # connect N, then close them all (or hold)
    python leaky_client.py trickle HOST PORT --count C --every S   # connect+close one every S seconds
    python leaky_client.py keepalive HOST PORT --idle I --chatty C --every S [--http]
    python leaky_client.py storm HOST PORT N             # N short request/response connections
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def emit(**kw: object) -> None:
    kw.setdefault("pid", os.getpid())
    kw.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def connect(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((host, port))
    return s


def exchange(s: socket.socket, http: bool) -> None:
    """One request and its complete response."""
    if not http:
        s.sendall(b"ping\n")
        got = b""
        while len(got) < 5:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("server closed")
            got += chunk
        return
    s.sendall(b"GET / HTTP/1.1\r\nHost: leaky\r\n\r\n")
    buf = b""
    for _ in range(1000):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("server closed")
        buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        if not sep:
            continue
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(body) >= length:
            return
    raise ConnectionError("response too long")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("hangup", "trickle", "keepalive", "storm"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int, nargs="?", default=1)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--idle", type=int, default=0)
    ap.add_argument("--chatty", type=int, default=0)
    ap.add_argument("--http", action="store_true")
    ap.add_argument("--lifetime", type=float, default=120.0)
    a = ap.parse_args()
    deadline = time.monotonic() + a.lifetime

    if a.mode == "hangup":
        conns = []
        for _ in range(a.n):
            s = connect(a.host, a.port)
            conns.append(s)
            emit(event="conn", lport=s.getsockname()[1], fd=s.fileno())
        emit(event="connected", count=len(conns))
        if not a.hold:
            for s in conns:
                s.close()
            emit(event="closed", count=len(conns))
        while time.monotonic() < deadline:
            time.sleep(0.2)
        return

    if a.mode == "trickle":
        for i in range(a.count):
            if time.monotonic() >= deadline:
                break
            s = connect(a.host, a.port)
            emit(event="conn", lport=s.getsockname()[1], i=i)
            s.close()
            time.sleep(a.every)
        emit(event="done")
        while time.monotonic() < deadline:
            time.sleep(0.2)
        return

    if a.mode == "storm":
        t0 = time.monotonic()
        for _ in range(a.n):
            s = connect(a.host, a.port)
            exchange(s, a.http)
            s.close()
        emit(event="done", count=a.n, seconds=time.monotonic() - t0)
        while time.monotonic() < deadline:
            time.sleep(0.2)
        return

    # keepalive: idle connections talk once, chatty ones keep talking.
    idle, chatty = [], []
    for kind, n, group in (("idle", a.idle, idle), ("chatty", a.chatty, chatty)):
        for _ in range(n):
            s = connect(a.host, a.port)
            exchange(s, a.http)
            group.append(s)
            emit(event="conn", kind=kind, lport=s.getsockname()[1], fd=s.fileno())
    emit(event="ready", idle=len(idle), chatty=len(chatty))
    while time.monotonic() < deadline:
        for s in chatty:
            exchange(s, a.http)
        time.sleep(a.every)


if __name__ == "__main__":
    main()
