"""Socket owners by BPF iterators vs the /proc walk, at N live sockets.

Run as root with any Python 3; measurements run in the pytracer venv:

    python3 bench/harness/fdscan.py --sockets 100000 --runs 5 [--before-tree /work/main]

Holds N/2 loopback connections (both ends in `churn hold` processes of
8,000 connections each, on 127.0.60.x), then, alternating the order every
round, runs each condition in a fresh process:

* ``scan``: ``pytracer.scan_fds(holder pids)`` once to load, then three times
  (median ``only_scan_s``: the walk reads exactly the holders' fds, the
  iterators still visit every fd on the host), then once host-wide
  (``host_scan_s``, with ``host_fds``); with ``--seed``, ``pytracer.seed()`` into
  a freshly loaded tracer; VmHWM.  Conditions ``proc`` (PYTRACER_FDSCAN=proc:
  the walk) and ``bpf``.
* ``watch`` (with ``--before-tree``): ``tracer watch --json --top 0`` for
  ``--watch-seconds``, from that tree and from this one; VmHWM at the end.

Prints one JSON line per measurement and a summary (medians, ranges).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import REPO, VENV_PY, Proc, build_churn  # noqa: E402

TREE = REPO

MEASURE = r"""
import json, os, statistics, sys, time
import pytracer

def hwm():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmRSS:", "VmHWM:"))}

only = [int(p) for p in os.environ["BENCH_ONLY"].split(",")]
out = {}
t0 = time.perf_counter()
s = pytracer.scan_fds(only)  # the first includes loading the iterators
out["first_scan_s"] = time.perf_counter() - t0
scans = []
for _ in range(3):
    t0 = time.perf_counter()
    s = pytracer.scan_fds(only)
    scans.append(time.perf_counter() - t0)
out.update(only_scan_s=statistics.median(scans), only_fds=s.fds, only_socket_fds=len(s.sockets.inodes))
t0 = time.perf_counter()
s = pytracer.scan_fds()
out.update(host_scan_s=time.perf_counter() - t0, host_fds=s.fds)
del s
out["hwm_after_scans_kib"] = hwm()["VmHWM"]
if os.environ.get("BENCH_SEED") == "1":
    with pytracer.Tracer(max_sockets=int(os.environ.get("BENCH_CAP", "262144"))) as tr:
        t0 = time.perf_counter()
        res = pytracer.seed(tr)
        out.update(seed_s=time.perf_counter() - t0, seeded=res.seeded + res.existed, with_owner=res.with_owner)
out["hwm_kib"] = hwm()["VmHWM"]
print(json.dumps(out))
"""


def status_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS:", "VmHWM:"))}


def measure_scan(method: str, only: list[int], seed: bool, cap: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(TREE), "PYTRACER_FDSCAN": method,
           "BENCH_ONLY": ",".join(map(str, only)), "BENCH_SEED": "1" if seed else "0", "BENCH_CAP": str(cap)}
    out = subprocess.run([VENV_PY, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_watch(tree: str, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    p = subprocess.Popen([VENV_PY, "-m", "pytracer", "watch", "--json", "--top", "0", "--interval", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + seconds + 60
        lines = 0
        t_first = None
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("{"):
                lines += 1
                t_first = t_first or time.monotonic()
            if (t_first and time.monotonic() - t_first >= seconds) or time.monotonic() > deadline:
                break
        st = status_kib(p.pid)
        return {"hwm_kib": st["VmHWM"], "rss_kib": st["VmRSS"], "reports": lines}
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def summary(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    return f"{statistics.median(vals):.4g} ({min(vals):.4g}-{max(vals):.4g}, n={len(vals)})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before-tree", help="a source tree whose `tracer watch` RSS is the baseline")
    ap.add_argument("--watch-seconds", type=float, default=8.0)
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--seed", action="store_true", help="also time pytracer.seed() (host-wide) in each scan run")
    ap.add_argument("--cap", type=int, default=262144, help="--max-sockets of the seeded tracer")
    args = ap.parse_args()
    churn = build_churn()
    holders: list[Proc] = []
    results: dict[str, list[dict]] = {}
    try:
        left, i = args.sockets // 2, 0
        while left > 0:
            k = min(8000, left)
            i += 1
            holders.append(Proc([churn, "hold", f"127.0.60.{i}", str(20000 + i), str(k)], name="churn-hold"))
            left -= k
        for h in holders:
            h.wait_for(lambda x: isinstance(x, dict) and x.get("role") == "hold", 300)
        print(json.dumps({"holders": len(holders), "connections": args.sockets // 2}), flush=True)
        for r in range(args.runs):
            conds = []
            if not args.skip_scan:
                conds += [("scan", "proc"), ("scan", "bpf")]
            if args.before_tree:
                conds += [("watch", "before"), ("watch", "after")]
            if r % 2:
                conds.reverse()
            for kind, cond in conds:
                if kind == "scan":
                    row = measure_scan("proc" if cond == "proc" else "auto", [h.pid for h in holders], args.seed,
                                       args.cap)
                else:
                    tree = args.before_tree if cond == "before" else str(TREE)
                    row = measure_watch(tree, args.watch_seconds)
                row.update(run=r, kind=kind, cond=cond, at=time.strftime("%H:%M:%S"),
                           load1=os.getloadavg()[0])
                results.setdefault(f"{kind}/{cond}", []).append(row)
                print(json.dumps(row), flush=True)
    finally:
        for h in holders:
            h.stop()
    for name, rows in results.items():
        keys = [k for k in ("only_scan_s", "first_scan_s", "host_scan_s", "host_fds", "seed_s", "hwm_after_scans_kib",
                            "hwm_kib", "rss_kib")
                if k in rows[0]]
        print(name + ": " + "; ".join(f"{k} {summary(rows, k)}" for k in keys), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
