"""Commands for tests/kernel/test_run.py to run under `tracer run`.  Each
prints JSON lines (with its own pid) on stdout and ends by itself.

    python run_programs.py http PORT N [--fixed] [--hold S] [--exit C]
        N HTTP/1.1 keep-alive requests on N connections to nginx; the leaky
        client never reads or closes its responses (they stay in a list, as
        a forgotten `resp.Body.Close()`), the fixed one reads and closes.
    python run_programs.py tree [--hold S]
        a runner forks a worker that forks a grandchild; the grandchild
        leaks one connection into CLOSE_WAIT and holds it.
    python run_programs.py daemon [--hold S]
        double-forks a daemon that listens on a free loopback port, then exits 0.
    python run_programs.py inherit N
        a server process listens on a free loopback port, forks and exits at
        once (as a daemon does), and its child serves N connections on the
        listener it inherited; the command makes those N connections itself.
    python run_programs.py sleep S
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time


def emit(**kw: object) -> None:
    kw.setdefault("pid", os.getpid())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def http_client(port: int, n: int, fixed: bool, hold: float) -> None:
    pool = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        if fixed:
            resp.read()
            resp.close()
            conn.close()
        else:
            pool.append((conn, resp))  # never read, never closed
        emit(event="request", status=resp.status)
    with open("/proc/self/comm") as f:
        emit(event="done", leaked=len(pool), comm=f.read().strip())
    time.sleep(hold)


def leak_close_wait(hold: float) -> None:
    """One connection whose peer (this process's accepted end) closes first."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    a.close()
    srv.close()
    emit(event="leaked", lport=c.getsockname()[1], fd=c.fileno())
    time.sleep(hold)


def tree(hold: float) -> None:
    worker = os.fork()
    if worker == 0:
        grandchild = os.fork()
        if grandchild == 0:
            leak_close_wait(hold)
            os._exit(0)
        os.waitpid(grandchild, 0)
        os._exit(0)
    emit(event="runner")
    os.waitpid(worker, 0)


def daemon(hold: float) -> None:
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            os.write(w, json.dumps({"pid": os.getpid(), "port": srv.getsockname()[1], "fd": srv.fileno()}).encode())
            os.close(w)
            for fd in (0, 1, 2):
                os.close(fd)
            time.sleep(hold)
            os._exit(0)
        os._exit(0)
    os.close(w)
    sys.stdout.write(os.read(r, 4096).decode() + "\n")
    sys.stdout.flush()


def inherit(n: int) -> None:
    r, w = os.pipe()
    opener = os.fork()
    if opener == 0:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(n)
        me = os.getpid()
        if os.fork() == 0:  # the server: it serves once the listener's opener is gone
            while _alive(me):  # exited and reaped by the command
                time.sleep(0.01)
            srv.settimeout(30)
            served = 0
            for _ in range(n):
                c, _ = srv.accept()
                c.recv(16)
                c.sendall(b"ok")
                c.close()
                served += 1
            os.write(w, json.dumps({"pid": os.getpid(), "served": served}).encode())
            os._exit(0)
        os.write(w, json.dumps({"opener": os.getpid(), "port": srv.getsockname()[1]}).encode() + b"\n")
        os._exit(0)
    os.close(w)
    os.waitpid(opener, 0)
    with os.fdopen(r, "rb") as pipe:
        first = json.loads(pipe.readline())
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", first["port"]), timeout=30)
            c.sendall(b"hi")
            assert c.recv(16) == b"ok"
            c.close()
        served = json.loads(pipe.read())
    emit(event="served", port=first["port"], opener=first["opener"], server=served["pid"], served=served["served"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("http", "tree", "daemon", "inherit", "sleep"))
    ap.add_argument("args", nargs="*", type=float)
    ap.add_argument("--fixed", action="store_true")
    ap.add_argument("--hold", type=float, default=3.0)
    ap.add_argument("--exit", type=int, default=0)
    a = ap.parse_args()
    if a.mode == "http":
        http_client(int(a.args[0]), int(a.args[1]), a.fixed, a.hold)
    elif a.mode == "tree":
        tree(a.hold)
    elif a.mode == "daemon":
        daemon(a.hold)
    elif a.mode == "inherit":
        inherit(int(a.args[0]))
    else:
        time.sleep(a.args[0])
    sys.exit(a.exit)


if __name__ == "__main__":
    main()
