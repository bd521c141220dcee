#!/usr/bin/env python3
"""The syscall tax of two tracer builds side by side, interleaved.

    python3 bench/harness/ab_syscalls.py --before /opt/pt-before/venv/bin/tracer [--after tracer] [--rounds 7]

Each round runs bench/harness/syscalls.c (getppid, open+close of a regular
file, pipe write+read; ns per op by the thread's CPU clock, which other
tenants' load does not inflate) under each condition in rotated order: no
tracer, ``BEFORE watch`` and ``AFTER watch`` (each started fresh, measured
once attached).  Prints one JSON object: per condition and loop, the median
ns per op and the ratio to "off" in the same round (median, min, max, n).
Only an enabled syscall tracepoint should move these loops: a TCP tracer
that attaches none leaves them within noise of "off".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import stats  # noqa: E402
from watching import SYSCALL_BATCHES, SYSCALL_N, build_syscalls  # noqa: E402

LOOPS = ("getppid", "openclose", "pipe")


def start_watch(tracer: str) -> subprocess.Popen:
    p = subprocess.Popen([tracer, "watch", "--json", "--interval", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    if not p.stdout.readline():  # the first report: attached and seeded
        p.kill()
        raise SystemExit(f"{tracer} watch printed no report")
    return p


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the baseline build's tracer")
    ap.add_argument("--after", default=shutil.which("tracer") or "tracer", help="the build under test")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ops", type=int, default=SYSCALL_N, help="operations per batch")
    args = ap.parse_args()
    binary = build_syscalls()
    conds = {"off": None, "before": args.before, "after": args.after}
    rows: dict[str, list[dict[str, float]]] = {c: [] for c in conds}
    tmp = Path(tempfile.mkdtemp(prefix="pytracer-ab-syscalls-"))
    try:
        for r in range(args.rounds):
            order = list(conds)[r % 3:] + list(conds)[: r % 3]
            for cond in order:
                p = start_watch(conds[cond]) if conds[cond] else None
                try:
                    time.sleep(1.0)
                    out = subprocess.run([binary, str(args.ops), str(SYSCALL_BATCHES), str(tmp)], capture_output=True,
                                         text=True, timeout=600, check=True).stdout
                finally:
                    if p is not None:
                        stop(p)
                d = json.loads(out)
                rows[cond].append({loop: stats(d[f"{loop}_cpu_ns"])["median"] for loop in LOOPS})
            print(f"round {r}: " + "; ".join(f"{c} " + " ".join(f"{rows[c][-1][x]:.0f}" for x in LOOPS)
                                           for c in conds), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, dict[str, object]] = {}
    for cond in conds:
        result[cond] = {f"{x}_ns": stats([row[x] for row in rows[cond]]) for x in LOOPS}
        if cond != "off":
            for x in LOOPS:
                result[cond][f"{x}_ratio"] = stats([a[x] / b[x] for a, b in zip(rows[cond], rows["off"])])
    result["command"] = {"argv": sys.argv, "before": args.before, "after": args.after,  # type: ignore[assignment]
                         "ops_per_batch": args.ops, "batches": SYSCALL_BATCHES}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
