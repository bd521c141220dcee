"""A TCP server with selectable bad habits, for the leak detection tests.

Prints JSON lines on stdout (``listening``, ``accepted``, ``peer_closed``,
``emfile``); reads commands on stdin (``close``: close every accepted socket).
Exits by itself after --lifetime seconds.

    python leaky_server.py hold HOST       # accept, echo, never close (CLOSE_WAIT leak)
    python leaky_server.py noaccept HOST   # listen, never accept (backlog)
    python leaky_server.py serve HOST      # well behaved: echo, close on EOF
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import time


def emit(**kw: object) -> None:
    kw.setdefault("pid", os.getpid())
    kw.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("hold", "noaccept", "serve"))
    ap.add_argument("host")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--backlog", type=int, default=128)
    ap.add_argument("--nofile", type=int, default=0, help="RLIMIT_NOFILE soft limit")
    ap.add_argument("--lifetime", type=float, default=120.0)
    args = ap.parse_args()
    if args.nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    lsock = socket.socket(fam, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.host, args.port))
    lsock.listen(args.backlog)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    if args.mode != "noaccept":
        sel.register(lsock, selectors.EVENT_READ, "listen")
    try:
        sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    except (PermissionError, ValueError):  # /dev/null or closed: no commands
        pass
    emit(event="listening", port=lsock.getsockname()[1], fd=lsock.fileno())

    held: list[socket.socket] = []
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            if key.data == "listen":
                try:
                    conn, peer = lsock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # EMFILE: the leak won
                    emit(event="emfile", error=str(exc))
                    sel.unregister(lsock)
                    continue
                conn.setblocking(False)
                held.append(conn)
                sel.register(conn, selectors.EVENT_READ, "conn")
                emit(event="accepted", fd=conn.fileno(), lport=conn.getsockname()[1], rport=peer[1])
            elif key.data == "stdin":
                line = sys.stdin.readline()
                if not line:
                    sel.unregister(sys.stdin)
                elif line.strip() == "close":
                    for c in held:
                        try:
                            sel.unregister(c)
                        except (KeyError, ValueError):
                            pass
                        c.close()
                    emit(event="closed_all", count=len(held))
                    held = []
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        conn.sendall(data)
                    except OSError:
                        pass
                    continue
                sel.unregister(conn)
                emit(event="peer_closed", fd=conn.fileno())
                if args.mode == "serve":
                    held.remove(conn)
                    conn.close()
                # hold: the bug under test, the socket is never closed.


if __name__ == "__main__":
    main()
