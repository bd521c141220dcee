#!/usr/bin/env python3
"""Per-state-change cost of a pt_sock record in a hash, in SK_STORAGE, and in a cookie-indexed array slot.

    python3 bench/harness/recordcost.py [--runs N] [--fill N] [--alone]

Loads bench/harness/recordcost.bpf.c (built here with clang) through pytracer's own
libbpf binding (the public pytracer.BpfObject), fills the hash with --fill records (the host's other
sockets, as seeding would), attaches its three tp_btf programs and runs the
churn loop.  Programs on one tracepoint run in attach order and the first
pays the cold cache lines of the socket, so every run is done twice, once
in each order, and the mean of the two medians is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib import REPO, bpf_stats_enabled, build_bpf, build_churn, prog_stats  # noqa: E402

sys.path.insert(0, str(REPO))

import pytracer  # noqa: E402

PROGS = ["rc_empty", "rc_clock", "rc_hash", "rc_sk_storage", "rc_slot"]


def build() -> bytes:
    return build_bpf("recordcost")


def session(data: bytes, order: list[str], runs: int, fill: int, churn: str, n: int) -> dict[str, float]:
    obj = pytracer.BpfObject(data, "recordcost")
    links = []
    try:
        obj.load()
        rnd = random.Random(1)
        blank = bytes(144)
        # The host's other sockets: in the hash, and (long-lived, moved out of
        # their slots) in the slot design's spill hash.
        for name in ("hash_recs", "slot_spill"):
            recs = obj.map(name)
            for _ in range(fill):
                recs.update(struct.pack("=Q", rnd.getrandbits(62) | 1 << 62), blank)
        links = [obj.program(p).attach() for p in order]
        ids = {obj.program(p).info().id: p for p in order}
        per: dict[str, list[float]] = {p: [] for p in order}
        for _ in range(runs):
            before = prog_stats(list(ids))
            subprocess.run([churn, "loop", "127.0.0.1", str(19000 + os.getpid() % 500), str(n)],
                           capture_output=True, check=True)
            after = prog_stats(list(ids))
            for i, name in ids.items():
                dc = after[i]["run_cnt"] - before[i]["run_cnt"]
                per[name].append((after[i]["run_time_ns"] - before[i]["run_time_ns"]) / dc)
        return {k: statistics.median(v) for k, v in per.items()}
    finally:
        for link in links:
            link.destroy()
        obj.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fill", type=int, default=100000, help="records put in the hash first")
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--alone", action="store_true",
                    help="each layout attached alone beside the empty program (both orders), not all together")
    args = ap.parse_args()
    data, churn = build(), build_churn()
    with bpf_stats_enabled():
        if args.alone:
            fwd, rev = {}, {}
            for p in PROGS[1:]:
                a = session(data, [p, PROGS[0]], args.runs, args.fill, churn, args.connections)
                b = session(data, [PROGS[0], p], args.runs, args.fill, churn, args.connections)
                fwd[p], rev[p] = a[p], b[p]
                fwd.setdefault(PROGS[0], []).append(a[PROGS[0]])
                rev.setdefault(PROGS[0], []).append(b[PROGS[0]])
            fwd[PROGS[0]] = statistics.median(fwd[PROGS[0]])
            rev[PROGS[0]] = statistics.median(rev[PROGS[0]])
        else:
            fwd = session(data, PROGS, args.runs, args.fill, churn, args.connections)
            rev = session(data, PROGS[::-1], args.runs, args.fill, churn, args.connections)
    print(f"{'program':<15} {'first order':>11} {'reversed':>9} {'mean':>6}  ns/run")
    for p in PROGS:
        print(f"{p:<15} {fwd[p]:>11.0f} {rev[p]:>9.0f} {(fwd[p] + rev[p]) / 2:>6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
