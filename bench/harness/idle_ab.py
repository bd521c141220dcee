#!/usr/bin/env python3
"""`tracer watch`'s own CPU idle with N live sockets, two source trees side by side.

    BEFORE=/path/to/old/tree python3 bench/harness/idle_ab.py N ROUNDS WINDOW_S [watch options]

BEFORE and AFTER are source trees with their BPF objects built (`make bpf`); AFTER defaults to this
tree.  Holds N loopback sockets with `churn hold` (at most 9,900 connections per holder, under a
20,000 fd limit), then per round starts `python -m pytracer watch` from each tree in turn (order
alternating), waits 6 s after its "attached" line (past the first full leak scan), and takes the
scheduler runtime of all its threads over WINDOW_S seconds.  Prints each run and the medians.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHURN = os.path.join(HERE, "..", "build", "churn")
PYTHON = os.environ.get("PYTHON", "/opt/pytracer/venv/bin/python")
PER_HOLDER = 9900
SETTLE_S = 6.0


def cpu_seconds(pid: int) -> float:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def rss_line(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return " ".join(line.split(":")[0] + " " + line.split()[1] + " kB" for line in f
                        if line.startswith(("VmRSS", "VmHWM")))


def hold(n: int) -> list[subprocess.Popen]:
    holders, left, i = [], n // 2, 0
    while left > 0:
        k, i = min(PER_HOLDER, left), i + 1
        p = subprocess.Popen([CHURN, "hold", f"127.0.{10 + i // 250}.{1 + i % 250}", str(40000 + i), str(k)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        holders.append(p)
        left -= k
    for p in holders:
        assert p.stdout is not None
        p.stdout.readline()  # its "hold" line: all connected
    return holders


def one_run(tree: str, window: float, extra: list[str]) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=tree)
    # cwd "/": `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
    p = subprocess.Popen([PYTHON, "-m", "pytracer", "watch", *extra], env=env, cwd="/", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        assert p.stderr is not None
        while "attached" not in p.stderr.readline():
            if time.monotonic() - t0 > 120 or p.poll() is not None:
                raise SystemExit(f"{tree}: tracer watch did not attach")
        time.sleep(SETTLE_S)
        a, t = cpu_seconds(p.pid), time.monotonic()
        time.sleep(window)
        b, wall = cpu_seconds(p.pid), time.monotonic() - t
        return (b - a) / wall * 100, rss_line(p.pid)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> int:
    n, rounds, window = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    extra = sys.argv[4:]
    trees = {"before": os.environ.get("BEFORE", "/work/wt-head"),
             "after": os.environ.get("AFTER", os.path.dirname(os.path.dirname(HERE)))}
    holders = hold(n)
    print(f"held {n} sockets", flush=True)
    res: dict[str, list[float]] = {k: [] for k in trees}
    try:
        for r in range(rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for name in order:
                pct, rss = one_run(trees[name], window, extra)
                res[name].append(pct)
                print(f"round {r} {name}: {pct:.2f}% of a core; {rss}", flush=True)
    finally:
        for p in holders:
            p.terminate()
        for p in holders:
            p.wait(60)
    for name, xs in res.items():
        print(f"{name}: median {statistics.median(xs):.2f}% (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
