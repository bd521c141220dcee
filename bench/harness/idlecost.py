#!/usr/bin/env python3
"""Cost of the idle-before-end work: this tree's BPF object against a base
revision's, attached side by side, in one interleaved run.

    python3 bench/harness/idlecost.py [--base main] [--runs N] [--connections N]

Builds the base revision's bpf/pytracer.bpf.c (from git, into bench/build),
loads it and this tree's pytracer/bpf/pytracer.bpf.o as two whole-host
tracers (pytracer.kernel.core.Tracer, the churn port named as a service in
the new one), and runs the churn loop.  Both tracers see the same events, so
each program's ns per run compares directly.  Programs on one tracepoint run
in attach order and the first pays the socket's cold cache lines, so the
runs are done in both orders and the mean of the two medians is printed,
with the ratio new / base per program and per connection (every program's
run time over the loop's connections).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib import BUILD, REPO, bpf_stats_enabled, build_churn, prog_stats  # noqa: E402

sys.path.insert(0, str(REPO))

from pytracer.inventory.services import Service, Spec, assign  # noqa: E402
from pytracer.kernel.abi import Role  # noqa: E402
from pytracer.kernel.core import Tracer  # noqa: E402

SOURCES = ("pytracer.bpf.c", "pytracer.h", "lifecycle.bpf.h", "core_fixes.bpf.h", "vmlinux.h")
NEW_OBJ = REPO / "pytracer" / "bpf" / "pytracer.bpf.o"


def build_base(ref: str) -> Path:
    d = BUILD / f"base-{ref.replace('/', '_')}"
    d.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:bpf/{name}"], check=True,
                             capture_output=True).stdout
        (d / name).write_bytes(src)
    out = d / "pytracer.bpf.o"
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror", f"-I{d}",
                    "-c", str(d / "pytracer.bpf.c"), "-o", str(out)], check=True)
    return out


def open_tracer(obj: Path, services: dict) -> Tracer:
    os.environ["PYTRACER_BPF_OBJECT"] = str(obj)
    try:
        return Tracer(services=services).open()
    finally:
        del os.environ["PYTRACER_BPF_OBJECT"]


def session(objs: dict[str, Path], order: list[str], runs: int, churn: str, port: int, n: int
            ) -> dict[str, dict[str, float]]:
    services = assign(Spec((Service(port, Role.SERVER), Service(port, Role.CLIENT)), auto=False))
    tracers = {}
    try:
        for name in order:
            tracers[name] = open_tracer(objs[name], services if name == "new" else {})
        ids = {(name, p.name): p.info().id for name, t in tracers.items() for p in t.programs()}
        per: dict[str, dict[str, list[float]]] = {name: {} for name in order}
        for _ in range(runs):
            before = prog_stats(list(ids.values()))
            subprocess.run([churn, "loop", "127.0.0.1", str(port), str(n)], capture_output=True, check=True)
            after = prog_stats(list(ids.values()))
            for name in order:
                total = 0
                for (owner, prog), i in ids.items():
                    if owner != name:
                        continue
                    dt = after[i]["run_time_ns"] - before[i]["run_time_ns"]
                    dc = after[i]["run_cnt"] - before[i]["run_cnt"]
                    total += dt
                    if dc:
                        per[name].setdefault(prog, []).append(dt / dc)
                per[name].setdefault("per_connection", []).append(total / n)
        return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in per.items()}
    finally:
        for t in tracers.values():
            t.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--connections", type=int, default=20000)
    args = ap.parse_args()
    objs = {"base": build_base(args.base), "new": NEW_OBJ}
    churn = build_churn()
    port = 19500 + os.getpid() % 400
    with bpf_stats_enabled():
        fwd = session(objs, ["base", "new"], args.runs, churn, port, args.connections)
        rev = session(objs, ["new", "base"], args.runs, churn, port, args.connections)
    keys = sorted(set(fwd["base"]) & set(fwd["new"]) & set(rev["base"]) & set(rev["new"]))
    print(f"{'program':<18} {'base ns':>8} {'new ns':>8} {'new/base':>8}   (mean of both attach orders)")
    for k in keys:
        b = (fwd["base"][k] + rev["base"][k]) / 2
        m = (fwd["new"][k] + rev["new"][k]) / 2
        print(f"{k:<18} {b:>8.0f} {m:>8.0f} {m / b if b else float('nan'):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
