#!/usr/bin/env python3
"""BPF cost per event as a user pays it: the tracer's programs attached
alone, then the floor's (empty tp_btf programs on the same hooks) attached
alone, in alternating rounds, under `ab -c 16` against nginx at saturation.

    python3 bench/harness/alonecost.py [--rounds 3] [--requests 300000] [--out FILE]

eventcost.py attaches both at once and averages the two attach orders, to
split the cost of the socket's cold cache lines fairly between them; alone,
a program pays them all, as it does on a host that runs only pytracer.  The
tracer is `tracer watch --interval 3600 --no-leaks` (its kernel side; user
space is idle).  Per program: ns per run (bpf_stats) and runs per
connection; per connection: the BPF time of all the programs.  The
bpftrace one-liner of the cost-of-watching section (lifetime.bt) is a
condition too: the peer's price for a record per socket.  Medians
(min-max, n) over rounds.  With BENCH_BEFORE_TRACER set, that build's
`watch` is a third condition ("before"), in the same rotation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib import TRACER, BenchError, Proc, bpf_stats_enabled, loaded_progs, prog_stats, running, start_nginx, stats  # noqa: E402

PORT = 18094
CONDITIONS = {
    "tracer": [TRACER, "watch", "--interval", "3600", "--no-leaks"],
    "floor": [sys.executable, str(HERE / "floor.py")],
    # The peer: tcplife's job the aggregate way in bpftrace (a birth map and a
    # lifetime histogram), on the same tracepoint, measured the same way.
    "bpftrace": ["bpftrace", "-q", str(HERE / "lifetime.bt")],
}
if os.environ.get("BENCH_BEFORE_TRACER"):
    CONDITIONS["before"] = [os.environ["BENCH_BEFORE_TRACER"], *CONDITIONS["tracer"][1:]]


def one(name: str, requests: int, port: int) -> dict[str, dict[str, float]]:
    proc = Proc(CONDITIONS[name], name=name)
    with running(proc):
        ids = loaded_progs(proc)
        before = prog_stats(ids)
        ab = Proc(["ab", "-q", "-n", str(requests), "-c", "16", f"http://127.0.0.1:{port}/"], name="ab", stdin=False)
        if ab.wait(600) != 0:
            raise BenchError(f"ab failed: {ab.stderr[-300:]}")
        after = prog_stats(ids)
    out = {}
    for i, a in after.items():
        b = before.get(i, {"run_time_ns": 0, "run_cnt": 0})
        runs = a["run_cnt"] - b["run_cnt"]
        if runs > 0:
            out[a["name"]] = {"ns_per_run": (a["run_time_ns"] - b["run_time_ns"]) / runs,
                              "runs_per_connection": runs / requests,
                              "ns_per_connection": (a["run_time_ns"] - b["run_time_ns"]) / requests}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300000)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "alonecost.json"))
    a = ap.parse_args()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in CONDITIONS}
    with tempfile.TemporaryDirectory() as tmp, bpf_stats_enabled():
        nginx = start_nginx(Path(tmp), PORT, keepalive=False)
        with running(nginx):
            for r in range(a.rounds):
                for name in (CONDITIONS if r % 2 == 0 else reversed(list(CONDITIONS))):
                    runs[name].append(one(name, a.requests, PORT))
                    per_conn = sum(p["ns_per_connection"] for p in runs[name][-1].values())
                    print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v['ns_per_run']:.1f} ns x "
                                                               f"{v['runs_per_connection']:.2f}"
                                                               for k, v in runs[name][-1].items())
                          + f"; {per_conn:.0f} ns per connection", flush=True)
    summary: dict[str, object] = {"command": "python3 bench/harness/alonecost.py " + " ".join(sys.argv[1:]),
                                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "programs": {}}
    for name, rs in runs.items():
        progs = sorted({k for r in rs for k in r})
        for p in progs:
            summary["programs"][p if name != "before" else f"before:{p}"] = {  # type: ignore[index]
                "ns_per_run": stats([r[p]["ns_per_run"] for r in rs if p in r]),
                "runs_per_connection": stats([r[p]["runs_per_connection"] for r in rs if p in r])}
        summary[f"{name}_ns_per_connection"] = stats([sum(v["ns_per_connection"] for v in r.values()) for r in rs])
    Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
