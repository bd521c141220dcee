"""Workloads for the exporter tests, each a process with its own comm.

Every role prints JSON lines on stdout, waits for "go" on stdin before it
opens any socket (so the exporter can be filtered on its pid first), then
holds what it made until a line on stdin (or EOF) tells it to exit.  All
connections go to a listener of its own on HOST, so a test can scope ss to
the listener's port.  Every loop is bounded; the hold has a deadline.

    python exporter_workload.py leaky HOST N SPACING    # N CLOSE_WAIT, one every SPACING s
    python exporter_workload.py idle HOST N             # N idle connections (2N ESTABLISHED ends)
    python exporter_workload.py churn HOST SHORT LONG HOLD  # SHORT brief + LONG HOLD-second conns
    python exporter_workload.py fdhog HOST N LIMIT      # RLIMIT_NOFILE=LIMIT, up to N conns, 4 fds short
    python exporter_workload.py flood HOST N            # N connections, fast
    python exporter_workload.py holder HOSTS N          # N connections spread over HOSTS (a,b,..)
    python exporter_workload.py idlereset HOST N IDLE   # N connections its clients abort after IDLE s idle
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import socket
import struct
import sys
import time

HOLD_DEADLINE_SECONDS = 900
SETTLE_S = 10.0  # idlereset: longer than a test scrape interval (4 s), twice


def emit(**kw: object) -> None:
    kw.setdefault("pid", os.getpid())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def listener(host: str, backlog: int = 4096) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(backlog)
    return s


def pair(lsock: socket.socket) -> tuple[socket.socket, socket.socket]:
    """One connection to our own listener: (client end, accepted end)."""
    c = socket.create_connection(lsock.getsockname()[:2], timeout=10)
    a, _ = lsock.accept()
    return c, a


def hold(keep: list, abort: bool = False) -> None:
    """Keep every socket open until stdin says so (or the deadline).  With
    ``abort``, close with RST (SO_LINGER 0) so no TIME_WAIT is left behind."""
    emit(event="holding", sockets=len(keep))
    deadline = time.monotonic() + HOLD_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        r, _, _ = select.select([sys.stdin], [], [], 1.0)
        if r:
            sys.stdin.readline()
            break
    linger = struct.pack("ii", 1, 0)
    for s in keep:
        if abort:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
        s.close()
    emit(event="exiting")


def wait_go(comm: str) -> None:
    set_comm(comm)
    emit(event="ready")
    sys.stdin.readline()


def leaky(host: str, n: int, spacing: float) -> None:
    """A server that never closes connections its client has closed."""
    wait_go("leakysrv")
    ls = listener(host)
    emit(event="listening", port=ls.getsockname()[1])
    keep: list = [ls]
    for i in range(n):
        c, a = pair(ls)
        c.close()  # the peer hangs up: a goes CLOSE_WAIT, forever
        keep.append(a)
        emit(event="leaked", n=i + 1)
        time.sleep(spacing)
    emit(event="done")
    hold(keep)


def idle(host: str, n: int) -> None:
    """Keep-alive connections that never carry a byte."""
    wait_go("idlepool")
    ls = listener(host)
    emit(event="listening", port=ls.getsockname()[1])
    keep: list = [ls]
    for _ in range(n):
        keep.extend(pair(ls))
    emit(event="done")
    hold(keep)


def churn(host: str, short: int, long: int, hold_s: float) -> None:
    """Opens and closes: brief connections (client closes first, so TIME_WAIT
    lands on the client's ephemeral port) and longer-lived ones."""
    wait_go("churn")
    ls = listener(host)
    emit(event="listening", port=ls.getsockname()[1])
    longs = []
    for i in range(max(short, long)):
        if i < long:
            longs.append((time.monotonic(), *pair(ls)))
        if i < short:
            c, a = pair(ls)
            c.sendall(b"ping")
            a.recv(4)
            c.close()
            a.close()
        # close the long ones whose time has come
        now = time.monotonic()
        for item in [x for x in longs if now - x[0] >= hold_s]:
            item[1].close()
            item[2].close()
            longs.remove(item)
        time.sleep(0.01)
    deadline = time.monotonic() + hold_s + 5
    while longs and time.monotonic() < deadline:
        now = time.monotonic()
        for item in [x for x in longs if now - x[0] >= hold_s]:
            item[1].close()
            item[2].close()
            longs.remove(item)
        time.sleep(0.05)
    emit(event="done", short=short, long=long)
    hold([ls])


def fdhog(host: str, n: int, limit: int) -> None:
    """A process close to its open-file limit."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    wait_go("fdhog")
    ls = listener(host)
    keep: list = [ls]
    for _ in range(n):  # at most n connections, stopping 4 fds short of the limit
        if len(os.listdir("/proc/self/fd")) + 2 > limit - 4:
            break
        keep.extend(pair(ls))
    emit(event="done", fds=len(os.listdir("/proc/self/fd")) - 1, limit=limit)
    hold(keep)


def flood(host: str, n: int) -> None:
    wait_go("flood")
    ls = listener(host)
    keep: list = [ls]
    for _ in range(n):
        keep.extend(pair(ls))
    emit(event="done")
    hold(keep)


def holder(hosts: list[str], n: int) -> None:
    """n connections (2n sockets) spread over listeners on several addresses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wait_go("holder")
    lss = [listener(h) for h in hosts]
    keep: list = list(lss)
    t0 = time.monotonic()
    for i in range(n):
        ls = lss[i % len(lss)]
        c = socket.socket()
        c.connect(ls.getsockname())
        keep.append(c)
        if i % 256 == 255 or i == n - 1:
            for lsx in lss:  # drain the accept queues
                lsx.setblocking(False)
                for _ in range(4096):
                    try:
                        a, _ = lsx.accept()
                    except BlockingIOError:
                        break
                    keep.append(a)
                lsx.setblocking(True)
    emit(event="done", sockets=len(keep) - len(lss), seconds=time.monotonic() - t0)
    hold(keep, abort=True)  # 100k sockets must not leave 50k TIME_WAIT for other tests


def idlereset(host: str, n: int, idle_s: float) -> None:
    """A server whose clients reset their connections after IDLE seconds
    without data: resets at one idle time, on the server's side.  The
    listener exists before "ready", so the exporter names its port."""
    set_comm("idlereset")
    ls = listener(host)
    emit(event="ready", port=ls.getsockname()[1])
    sys.stdin.readline()
    # One orderly connection first, and a few scrapes' time: the service's
    # counters exist (at 0 resets) before the resets come.
    c, a = pair(ls)
    c.close()
    a.close()
    time.sleep(SETTLE_S)
    conns = []
    for _ in range(n):
        c, a = pair(ls)
        c.sendall(b"q")
        a.recv(1)
        a.sendall(b"a")
        c.recv(1)
        conns.append((c, a))
    time.sleep(idle_s)
    for c, _a in conns:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    for _c, a in conns:
        a.close()
    emit(event="done")
    hold([ls])


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "leaky":
        leaky(argv[1], int(argv[2]), float(argv[3]))
    elif role == "idle":
        idle(argv[1], int(argv[2]))
    elif role == "churn":
        churn(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    elif role == "fdhog":
        fdhog(argv[1], int(argv[2]), int(argv[3]))
    elif role == "flood":
        flood(argv[1], int(argv[2]))
    elif role == "holder":
        holder(argv[1].split(","), int(argv[2]))
    elif role == "idlereset":
        idlereset(argv[1], int(argv[2]), float(argv[3]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
