"""What `tracer run -- LOAD` costs next to `tracer watch --pid LOAD` and no tracer.

    python3 bench/harness/run_cost.py [--rounds 6] [--count 20000] [--rate 4000]

The load is the epoll churn pair (bench/harness/churn.c: `churn server` and a
paced `churn client`), started by this file itself in ``load`` mode, which
prints one JSON line: connections, and the CPU of the server and the client
(scheduler runtime, exact: the client's own CLOCK_PROCESS_CPUTIME_ID, the
server's /proc/PID/schedstat before it stops).  BPF programs run in the
context of the task that hits the hook, so the tracer's kernel cost is in
those figures; the tracer process's own CPU (utime+stime from /proc, read
just before it is stopped) is reported beside them.  Conditions:

  off    the load alone
  watch  `tracer watch --pid SERVER --pid CLIENT` (attached before the client starts)
  run    `tracer run -- python3 run_cost.py load ...` (the tree followed in the kernel)

Conditions are interleaved and their order rotated every round; the output
is the median and range of CPU per connection (us) per condition, of each
traced condition's ratio to the off run of the same round, and of run's
ratio to watch in the same round.  Every
process started here is stopped by pid; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import build_churn  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def schedstat_s(pid: int) -> float:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def utime_stime_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def load(churn: str, port: int, count: int, rate: int, wait: bool) -> None:
    """The churn pair; with ``wait``, print the pids and wait for a line on stdin first."""
    server = subprocess.Popen([churn, "server", "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    env = {**os.environ, "CHURN_WAIT": "1"}
    client = subprocess.Popen([churn, "client", "127.0.0.1", str(port), str(count), "8", str(rate)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    if wait:
        print(json.dumps({"server": server.pid, "client": client.pid}), flush=True)
        sys.stdin.readline()
    s0 = schedstat_s(server.pid)
    out, _ = client.communicate("go\n", timeout=600)
    s1 = schedstat_s(server.pid)
    server.stdin.close()  # type: ignore[union-attr]
    server.terminate()
    server.wait(timeout=30)
    c = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"client": c, "server_cpu_s": s1 - s0}), flush=True)


def tracer_exe() -> list[str]:
    exe = shutil.which("tracer")
    return [exe] if exe else [sys.executable, "-m", "pytracer"]


def one(cond: str, churn: str, port: int, count: int, rate: int) -> dict:
    me = [sys.executable, __file__, "load", "--churn", churn, "--port", str(port), "--count", str(count),
          "--rate", str(rate)]
    tracer_cpu = None
    if cond == "off":
        out = subprocess.run(me, capture_output=True, text=True, timeout=600, check=True).stdout
    elif cond == "run":
        p = subprocess.Popen([*tracer_exe(), "run", "--fail-on", "none", "--", *me], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        out_lines = []
        for line in p.stdout:  # type: ignore[union-attr]
            out_lines.append(line)
            if line.startswith('{"client"'):
                tracer_cpu = utime_stime_s(p.pid)
        p.wait(timeout=120)
        out = "".join(out_lines)
    else:
        lp = subprocess.Popen([*me, "--wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        pids = json.loads(lp.stdout.readline())  # type: ignore[union-attr]
        w = subprocess.Popen([*tracer_exe(), "watch", "--json", "--pid", str(pids["server"]), "--pid",
                              str(pids["client"])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            line = w.stderr.readline()  # type: ignore[union-attr]
            assert line.startswith("tracer: attached"), line
            lp.stdin.write("go\n")  # type: ignore[union-attr]
            lp.stdin.flush()  # type: ignore[union-attr]
            out = lp.stdout.readline()  # type: ignore[union-attr]
            tracer_cpu = utime_stime_s(w.pid)
            lp.wait(timeout=60)
        finally:
            w.send_signal(signal.SIGTERM)
            w.wait(timeout=60)
    res = json.loads([ln for ln in out.splitlines() if ln.startswith('{"client"')][-1])
    c = res["client"]
    n = int(c.get("completed") or c.get("connections") or c.get("done") or count)
    cpu = float(c.get("cpu_seconds") or c.get("cpu_s") or 0.0) + res["server_cpu_s"]
    return {"cond": cond, "connections": n, "cpu_us_per_conn": cpu / n * 1e6, "tracer_cpu_s": tracer_cpu,
            "client": c}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="bench", choices=("bench", "load"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=4000)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--churn", default=None)
    ap.add_argument("--wait", action="store_true")
    a = ap.parse_args()
    if a.mode == "load":
        load(a.churn, a.port, a.count, a.rate, a.wait)
        return
    churn = build_churn()
    conds = ["off", "watch", "run"]
    rows = []
    for r in range(a.rounds):
        order = conds[r % 3:] + conds[: r % 3]
        for cond in order:
            rows.append({**one(cond, churn, a.port, a.count, a.rate), "round": r})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "client"}), file=sys.stderr, flush=True)
    summary = {}
    for cond in conds:
        v = [x["cpu_us_per_conn"] for x in rows if x["cond"] == cond]
        summary[cond] = {"median_us": round(statistics.median(v), 2), "min_us": round(min(v), 2),
                         "max_us": round(max(v), 2), "n": len(v)}
        t = [x["tracer_cpu_s"] for x in rows if x["cond"] == cond and x["tracer_cpu_s"] is not None]
        if t:
            summary[cond]["tracer_cpu_s_median"] = round(statistics.median(t), 3)
    def per_round(cond: str, base: str) -> list[float]:
        def at(r: int, c: str) -> float:
            return next(x["cpu_us_per_conn"] for x in rows if x["round"] == r and x["cond"] == c)
        return [at(r, cond) / at(r, base) for r in range(a.rounds)]

    for cond, base in (("watch", "off"), ("run", "off"), ("run", "watch")):
        ratios = per_round(cond, base)
        summary[cond][f"ratio_to_{base}_median"] = round(statistics.median(ratios), 4)
        summary[cond][f"ratio_to_{base}_range"] = [round(min(ratios), 4), round(max(ratios), 4)]
    print(json.dumps({"rounds": a.rounds, "count": a.count, "rate": a.rate, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
