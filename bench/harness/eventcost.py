#!/usr/bin/env python3
"""BPF cost per event: pytracer's programs against the floor (empty tp_btf
programs on the same hooks, bench/harness/floor.py), both attached at once,
in the same run, on the same connections.

    python3 bench/harness/eventcost.py [--runs 5] [--connections 20000] [--out FILE]
                                       [--object NAME=PATH[:ARGS] ...] [--rounds 1]

With --object, the same measurement is made for each named kernel object in
turn (`tracer watch` with PYTRACER_BPF_OBJECT=PATH: objects of the same map
ABI as the installed tracer), interleaved over --rounds, so two builds are
compared as ratios to the floor measured beside each of them.  ARGS are
more `tracer watch` options for that one (PATH may be empty: the installed
object), e.g. `--object small=:--max-sockets=16384`.

Programs on one hook run in attach order and the first pays the socket's
cold cache lines, so each run is done in both orders (floor first, tracer
first) and the two are averaged.  Per program: ns per run (bpf_stats), runs
per connection; per connection: the BPF time of all the tracer's programs
and of the floor's.  Load: `churn loop` (connect, accept, close over
loopback, one process), the tracer is `tracer watch` with defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import floor  # noqa: E402
from lib import TRACER, Proc, _bpftool_json, bpf_stats_enabled, build_churn, prog_stats  # noqa: E402


def held_prog_ids(pid: int) -> set[int]:
    """Programs behind the process's BPF fds (programs and links: their fdinfo's prog_id)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                out.update(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
        except OSError:
            pass
    return out


def tracer_prog_ids(pid: int, timeout: float = 60) -> dict[int, str]:
    """The tracer's attached BPF programs, id -> name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = held_prog_ids(pid)
        ids = {p["id"]: p.get("name", "") for p in _bpftool_json("prog", "show") if p["id"] in held}
        if any(n.startswith("state") for n in ids.values()):
            return ids
        time.sleep(0.2)
    raise RuntimeError(f"tracer {pid} did not attach within {timeout:.0f}s")


def start_tracer(out: Path, obj: str | None = None) -> tuple[Proc, dict[int, str]]:
    """`tracer watch` (defaults, or PATH:ARGS), once it reports (attached and seeded)."""
    out.unlink(missing_ok=True)
    path, _, args = (obj or "").partition(":")
    env = {**os.environ, "PYTRACER_BPF_OBJECT": path} if path else None
    p = Proc([TRACER, "watch", *args.split()], env=env, stdout_file=str(out), stdin=False, name="watch")
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size > 0):
        if p.p.poll() is not None or time.monotonic() > deadline:
            p.stop()
            raise RuntimeError(f"tracer watch did not report: {p.stderr.strip()[-300:]}")
        time.sleep(0.05)
    try:
        return p, tracer_prog_ids(p.pid)
    except BaseException:
        p.stop()
        raise


def one_order(tracer_first: bool, runs: int, n: int, churn: str, out: Path,
              obj: str | None = None) -> dict[str, Any]:
    tr: Proc | None = None
    try:
        if tracer_first:
            tr, ids = start_tracer(out, obj)
        with floor.attached() as fids:
            if not tracer_first:
                tr, ids = start_tracer(out, obj)
            allids = {**ids, **{i: n_ for n_, i in fids.items()}}
            per: dict[str, list[tuple[float, float]]] = {}
            for _ in range(runs):
                before = prog_stats(list(allids))
                subprocess.run([churn, "loop", "127.0.0.1", str(19500 + os.getpid() % 400), str(n)],
                               capture_output=True, check=True, timeout=600)
                after = prog_stats(list(allids))
                for i, name in allids.items():
                    if i not in after or i not in before:
                        continue
                    dc = after[i]["run_cnt"] - before[i]["run_cnt"]
                    dt = after[i]["run_time_ns"] - before[i]["run_time_ns"]
                    per.setdefault(name, []).append((dt / dc if dc else 0.0, dc / n))
    finally:
        if tr:
            tr.stop()
    return {name: {"ns_per_run": statistics.median(x[0] for x in v), "runs_per_connection":
                   statistics.median(x[1] for x in v)} for name, v in per.items()}


def summarize(orders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = sorted({k for o in orders.values() for k in o})
    mean = {k: {f: statistics.mean(o[k][f] for o in orders.values() if k in o)
                for f in ("ns_per_run", "runs_per_connection")} for k in names}
    per_conn = {who: sum(v["ns_per_run"] * v["runs_per_connection"] for k, v in mean.items()
                         if k.startswith("floor_") == (who == "floor")) for who in ("floor", "tracer")}
    return {"orders": orders, "mean": mean, "per_connection_ns": per_conn}


def show(label: str, r: dict[str, Any]) -> None:
    orders, mean, per_conn = r["orders"], r["mean"], r["per_connection_ns"]
    floor_state = mean["floor_state"]["ns_per_run"]
    print(f"{label}")
    print(f"{'program':<22} {'floor first':>11} {'tracer first':>12} {'mean ns':>8} {'x floor':>7} {'runs/conn':>9}")
    for k in sorted(mean):
        a, b = (orders[o].get(k, {}).get("ns_per_run", float("nan")) for o in orders)
        ratio = mean[k]["ns_per_run"] / floor_state if floor_state else float("nan")
        print(f"{k:<22} {a:>11.0f} {b:>12.0f} {mean[k]['ns_per_run']:>8.0f} {ratio:>7.2f} "
              f"{mean[k]['runs_per_connection']:>9.2f}")
    print(f"BPF ns per connection: tracer {per_conn['tracer']:.0f}, floor {per_conn['floor']:.0f} "
          f"({per_conn['tracer'] / per_conn['floor']:.2f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--object", action="append", default=[], metavar="NAME=PATH",
                    help="a kernel object to measure (repeat to compare builds)")
    ap.add_argument("--rounds", type=int, default=1, help="with --object: rounds over all the objects")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "eventcost.json"))
    args = ap.parse_args()
    objects = dict(o.split("=", 1) for o in args.object) or {"installed": ""}
    churn = build_churn()
    per_round: dict[str, list[dict[str, Any]]] = {k: [] for k in objects}
    with tempfile.TemporaryDirectory() as tmp, bpf_stats_enabled():
        out = Path(tmp) / "watch.out"
        for r in range(args.rounds):
            names = list(objects)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                obj = objects[name] or None
                orders = {"floor first": one_order(False, args.runs, args.connections, churn, out, obj),
                          "tracer first": one_order(True, args.runs, args.connections, churn, out, obj)}
                per_round[name].append(summarize(orders))
    results: dict[str, Any] = {}
    for name, rounds in per_round.items():
        for i, r in enumerate(rounds):
            show(f"== {name}, round {i + 1}", r)
        ratios = [r["mean"][k]["ns_per_run"] / r["mean"]["floor_state"]["ns_per_run"]
                  for r in rounds for k in r["mean"] if k.startswith("state")]
        conn = [r["per_connection_ns"]["tracer"] for r in rounds]
        results[name] = {"object": objects[name], "rounds": rounds,
                         "state_x_floor": ratios, "per_connection_ns": conn}
        print(f"== {name}: state x floor {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}, "
              f"n={len(ratios)}); BPF ns per connection {statistics.median(conn):.0f} "
              f"({min(conn):.0f}-{max(conn):.0f})")
    doc: dict[str, Any] = {"command": "python3 bench/harness/eventcost.py " + " ".join(sys.argv[1:]),
                           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if list(objects) == ["installed"]:
        doc.update(results["installed"]["rounds"][0])
    else:
        doc["objects"] = results
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
