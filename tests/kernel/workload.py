"""Real TCP workloads for the kernel tests, run as separate processes.

Each role prints JSON lines on stdout with its own CLOCK_MONOTONIC readings,
which are the ground truth the tests compare the tracer against.  A role
waits for a line on stdin before it starts ("go"), so a test can attach the
tracer, filtered on this process's pid, before any socket exists.

    python workload.py server HOST PORT COUNT        # accept COUNT, close after EOF
    python workload.py client HOST PORT HOLD[,HOLD]  # connect, hold, close first
    python workload.py burst-server HOST PORT COUNT  # accept+close COUNT
    python workload.py burst-client HOST PORT COUNT  # connect+close COUNT
    python workload.py stepper HOST PORT             # scripted exchange, step by step
"""

from __future__ import annotations

import json
import socket
import sys
import time


def emit(**kw: object) -> None:
    kw.setdefault("pid", __import__("os").getpid())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def wait_go() -> None:
    emit(event="ready")
    sys.stdin.readline()


def listen(host: str, port: int) -> socket.socket:
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(4096)
    s.settimeout(60)
    return s


def server(host: str, port: int, count: int) -> None:
    wait_go()
    s = listen(host, port)
    emit(event="listening", port=s.getsockname()[1])
    for _ in range(count):
        c, peer = s.accept()
        c.settimeout(60)
        emit(event="accepted", fd=c.fileno(), lport=c.getsockname()[1], rport=peer[1], t=time.monotonic())
        for _ in range(1 << 20):
            if not c.recv(65536):
                break
        c.close()
        emit(event="closed", rport=peer[1], t=time.monotonic())
    s.close()


def client(host: str, port: int, holds: list[float]) -> None:
    wait_go()
    for hold in holds:
        c = socket.socket(family_of(host), socket.SOCK_STREAM)
        t0 = time.monotonic()
        c.connect((host, port))
        t1 = time.monotonic()
        lport = c.getsockname()[1]
        emit(event="connected", lport=lport, fd=c.fileno(), t=t0, t_established=t1)
        c.sendall(b"x")
        time.sleep(hold)
        c.close()
        emit(event="conn", lport=lport, t_connect=t0, t_established=t1, t_close=time.monotonic(), hold=hold)
        time.sleep(0.05)
    emit(event="done")


def burst_server(host: str, port: int, count: int) -> None:
    wait_go()
    s = listen(host, port)
    emit(event="listening", port=s.getsockname()[1])
    for _ in range(count):
        c, _ = s.accept()
        c.close()
    s.close()
    emit(event="done", count=count)


def burst_client(host: str, port: int, count: int) -> None:
    wait_go()
    t0 = time.monotonic()
    for _ in range(count):
        c = socket.socket(family_of(host), socket.SOCK_STREAM)
        c.settimeout(30)
        c.connect((host, port))
        c.recv(1)  # the server closes first: TIME_WAIT stays on its side
        c.close()
    emit(event="done", count=count, seconds=time.monotonic() - t0)


def stepper(host: str, port: int) -> None:
    """Both ends in one process, advanced one step per stdin line."""
    wait_go()
    lsock = listen(host, port)
    emit(event="step", name="listening", port=lsock.getsockname()[1])
    sys.stdin.readline()
    c = socket.socket(family_of(host), socket.SOCK_STREAM)
    c.connect((host, lsock.getsockname()[1]))
    a, _ = lsock.accept()
    emit(event="step", name="established", client_lport=c.getsockname()[1], server_fd=a.fileno())
    sys.stdin.readline()
    c.shutdown(socket.SHUT_WR)  # client FIN: client FIN_WAIT2, server CLOSE_WAIT
    time.sleep(0.05)
    emit(event="step", name="half_closed")
    sys.stdin.readline()
    a.close()  # server FIN: server LAST_ACK -> CLOSE, client TIME_WAIT
    time.sleep(0.05)
    c.close()
    emit(event="step", name="closed")
    sys.stdin.readline()
    lsock.close()
    emit(event="step", name="done")


def main(argv: list[str]) -> None:
    role, host, port = argv[0], argv[1], int(argv[2])
    if role == "server":
        server(host, port, int(argv[3]))
    elif role == "client":
        client(host, port, [float(x) for x in argv[3].split(",")])
    elif role == "burst-server":
        burst_server(host, port, int(argv[3]))
    elif role == "burst-client":
        burst_client(host, port, int(argv[3]))
    elif role == "stepper":
        stepper(host, port)
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
