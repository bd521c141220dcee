"""A pooled client and its server, for the idle-reset middlebox test.

    idle_pool.py server PORT
        Answers each line with a line, per connection, until EOF.
    idle_pool.py client HOST PORT N IDLE [IDLE ...]
        Opens N connections and makes one request on each; then, for each
        IDLE in turn, leaves the pool idle that many seconds and makes one
        request on every connection still open.  A request that fails
        (reset, or the connection closed) is counted and its connection
        closed.  Then closes the rest.  Prints one JSON line: requests,
        failed, and the failures' idle times.
    idle_pool.py keepalive HOST PORT
        One connection with one request, then TCP keepalive after 1 s idle,
        probes 1 s apart, 2 unanswered end it.  Says "connected", waits for
        a line on stdin, then for the connection's error; prints it and how
        long after the last data it came.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading
import time


def serve(port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    print(json.dumps({"event": "listening", "port": port}), flush=True)

    def handle(c: socket.socket) -> None:
        with c:
            f = c.makefile("rb")
            try:
                for line in f:
                    c.sendall(b"ok " + line)
            except OSError:
                pass

    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def request(c: socket.socket) -> bool:
    try:
        c.sendall(b"ping\n")
        return c.recv(64).startswith(b"ok ")
    except OSError:
        return False


def client(host: str, port: int, n: int, idles: list[float]) -> None:
    pool = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    requests, failed, failed_idle = 0, 0, []
    last = {}
    for c in pool:
        requests += 1
        assert request(c), "first request failed"
        last[c] = time.monotonic()
    for idle in idles:
        time.sleep(idle)
        for c in list(pool):
            requests += 1
            if request(c):
                last[c] = time.monotonic()
                continue
            failed += 1
            failed_idle.append(round(time.monotonic() - last[c], 3))
            pool.remove(c)
            c.close()
    for c in pool:
        c.close()
    print(json.dumps({"event": "done", "requests": requests, "failed": failed, "failed_idle": failed_idle}),
          flush=True)


def keepalive(host: str, port: int) -> None:
    c = socket.create_connection((host, port), timeout=10)
    assert request(c), "request failed"
    last = time.monotonic()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
    c.settimeout(30)
    print(json.dumps({"event": "connected"}), flush=True)
    sys.stdin.readline()
    try:
        got = c.recv(64)
        error = f"eof {got!r}"
    except OSError as exc:
        error = type(exc).__name__ if exc.errno is None else errno.errorcode.get(exc.errno, str(exc.errno))
    idle = time.monotonic() - last
    c.close()
    print(json.dumps({"event": "done", "error": error, "idle": round(idle, 3)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "keepalive":
        keepalive(sys.argv[2], int(sys.argv[3]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [float(x) for x in sys.argv[5:]])
