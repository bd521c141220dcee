#!/usr/bin/env python3
"""The tracer process's own CPU (% of one core) beside a paced connection
load, for several builds or commands side by side, conditions rotated per
round.

    python3 bench/harness/owncpu.py [--rounds 4] [--seconds 60] [--rate 4000] [--settle 20] \\
        before="/opt/pt-before/venv/bin/tracer watch" after="tracer watch"

One nginx (no keep-alive) and one ``churn http`` client paced at RATE
connections/s run through the whole benchmark, so every condition meets the
same steady state (TIME_WAIT sockets included: RATE x 60 s of them once the
load has run a minute).  Per round, each condition in turn: started, left
SETTLE seconds once its programs are loaded, then its scheduler runtime
(utime + stime of every thread, exact; /proc/stat is tick-sampled here) taken
over SECONDS.  A command with ``export`` in it is scraped every 5 s.  Use a
window of a minute or more: some of the tracer's work (the TIME_WAIT refresh,
the full leak scan) comes every 15-60 s.  Prints each run, then per condition
the median (min-max, n); writes them to --out.  Everything it started is
stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib import BenchError, Proc, build_churn, loaded_progs, running, start_nginx, stats, unwind_on_signals  # noqa: E402
from watching import cpu_delta_s, cpu_reading  # noqa: E402

PORT = 18783
CONC = 64


def scrape_every(url: str, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                r.read()
        except OSError:
            pass


def one(argv: list[str], name: str, settle: float, seconds: float) -> float:
    """% of one core ``argv`` used over ``seconds``, once settled."""
    tracer = Proc(argv, name=name)
    stop = threading.Event()
    with running(tracer):
        loaded_progs(tracer, settle=settle)
        if "export" in argv and "--listen" in argv:
            url = f"http://{argv[argv.index('--listen') + 1]}/metrics"
            threading.Thread(target=scrape_every, args=(url, 5.0, stop), daemon=True).start()
        try:
            a, t0 = cpu_reading(tracer.pid), time.monotonic()
            time.sleep(seconds)
            b, t1 = cpu_reading(tracer.pid), time.monotonic()
        finally:
            stop.set()
        if tracer.p.poll() is not None:
            raise BenchError(f"{name} exited during its window: {tracer.stderr[-300:]}")
    return 100.0 * cpu_delta_s(a, b) / (t1 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("conditions", nargs="+", metavar="NAME=COMMAND")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=4000.0)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "owncpu.json"))
    a = ap.parse_args()
    conds = {}
    for spec in a.conditions:
        name, sep, cmd = spec.partition("=")
        if not sep or not cmd.strip():
            ap.error(f"{spec!r}: expected NAME=COMMAND")
        conds[name] = shlex.split(cmd)
    unwind_on_signals()
    runs: dict[str, list[float]] = {c: [] for c in conds}
    churn = build_churn()
    # Enough connections to outlast every round; the client is stopped at the end.
    total = int(a.rate * (a.seconds + a.settle + 30) * a.rounds * len(conds) * 2)
    with tempfile.TemporaryDirectory() as tmp:
        nginx = start_nginx(Path(tmp), PORT, keepalive=False)
        load = Proc([churn, "http", "127.0.0.1", str(PORT), str(total), str(CONC), f"{a.rate:g}"],
                    name="churn-http", stdin=False)
        with running(nginx, load):
            time.sleep(5)
            for r in range(a.rounds):
                names = list(conds)
                names = names[r % len(names):] + names[: r % len(names)]
                for name in names:
                    runs[name].append(one(conds[name], name, a.settle, a.seconds))
                    print(f"round {r + 1} {name}: {runs[name][-1]:.2f}% of one core", flush=True)
    summary = {"command": "python3 bench/harness/owncpu.py " + shlex.join(sys.argv[1:]),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rate": a.rate,
               "seconds": a.seconds, "pct_of_one_core": {c: stats(v) for c, v in runs.items()}}
    Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    for c, v in runs.items():
        s = stats(v)
        print(f"{c:12s} median {s['median']:.2f}% ({s['min']:.2f}-{s['max']:.2f}, n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
