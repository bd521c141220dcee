#!/usr/bin/env python3
"""Two installed builds of `tracer` side by side on a host holding many idle
connections: peak RSS while the sockets are young, own CPU once they form a
leak pile.

    BEFORE=/opt/pt-before/venv/bin/tracer python3 bench/harness/leakpile.py MODE PAIRS ROUNDS

MODE ``hwm``: holds PAIRS loopback connections (2 x PAIRS sockets) and, per
round, runs `tracer watch` and `tracer export` of each build in turn for 22 s
(export scraped three times), then reads VmHWM: seeding, the first full leak
scan and the first table reads are all in it.  The sockets stay younger than
--idle-after (300 s), so nothing is flagged.  With PAIRS 0 it measures the
same with no held sockets (the baseline the figures are taken over).

MODE ``pile``: holds PAIRS connections until they are idle past --idle-after
(310 s), so every socket is flagged ``idle_established``, then per round runs
each command of each build for 25 s to settle and takes its scheduler runtime
(utime + stime, all threads) over the next 60 s; export is scraped every 5 s.

AFTER defaults to /opt/pytracer/venv/bin/tracer.  Prints each run, then the
medians.  Every holder and tracer is stopped at the end, also on error.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_ab import hold  # noqa: E402
from lib import cpu_seconds, rss_kib  # noqa: E402

BUILDS = {"before": os.environ.get("BEFORE", "/opt/pt-before/venv/bin/tracer"),
          "after": os.environ.get("AFTER", "/opt/pytracer/venv/bin/tracer")}
LISTEN = "127.0.0.1:9977"
IDLE_AFTER_S = 300.0


def scrape() -> None:
    try:
        with urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=10) as r:
            r.read()
    except OSError:
        pass


def start(tracer: str, cmd: str) -> subprocess.Popen:
    argv = [tracer, "export", "--listen", LISTEN] if cmd == "export" else [tracer, "watch"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one(tracer: str, cmd: str, mode: str) -> float:
    p = start(tracer, cmd)
    try:
        if mode == "hwm":
            time.sleep(22)
            if cmd == "export":
                for _ in range(3):
                    scrape()
                    time.sleep(1)
            return rss_kib(p.pid)["VmHWM"] / 1024
        time.sleep(25)
        a, t0 = cpu_seconds(p.pid), time.monotonic()
        while time.monotonic() - t0 < 60:  # bounded: 12 scrapes of at most 10 s each
            if cmd == "export":
                scrape()
            time.sleep(5)
        return (cpu_seconds(p.pid) - a) / (time.monotonic() - t0) * 100
    finally:
        stop(p)


def main() -> int:
    mode, pairs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode not in ("hwm", "pile"):
        print("MODE is hwm or pile", file=sys.stderr)
        return 2
    holders = hold(2 * pairs) if pairs else []
    try:
        if mode == "pile":
            time.sleep(IDLE_AFTER_S + 10)  # every held socket idle past --idle-after: all flagged
        got: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for cmd in ("watch", "export"):
                for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    v = one(BUILDS[label], cmd, mode)
                    got.setdefault((cmd, label), []).append(v)
                    unit = "MiB peak RSS" if mode == "hwm" else "% of a core"
                    print(f"round {r + 1} {cmd:6s} {label:6s} {v:7.2f} {unit}", flush=True)
        for (cmd, label), vals in sorted(got.items()):
            print(f"median {cmd:6s} {label:6s} {statistics.median(vals):7.2f}  "
                  f"({min(vals):.2f}-{max(vals):.2f}, n={len(vals)})")
    finally:
        for h in holders:
            h.kill()
            h.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
