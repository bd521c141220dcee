"""Time one poll cycle of `tracer watch` at scale, in-process.

Run with the pytracer venv's Python; uses pytracer's public API only.  Loads
and attaches the tracer, prints {"attached": true}, then waits for a line N
on stdin, times N cycles of exactly what each `tracer watch` interval does
(pytracer.snapshot, narrow with a pytracer.ViewReducer, + pytracer.build_report),
and prints the times, the map size and this process's RSS; then
times seeding every live socket into a fresh tracer (up to 5 times, a new
tracer each time; the median is ``seed_s``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import pytracer


def rss_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS:", "VmHWM:"))}


def main() -> int:
    cap = int(sys.argv[1]) if len(sys.argv) > 1 else 262144
    start_ns = time.monotonic_ns()
    with pytracer.Tracer(max_sockets=cap) as tracer:
        print(json.dumps({"attached": True}), flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        opts = pytracer.ReportOptions(top=10, start_mono_ns=start_ns, max_sockets=cap)
        # As `tracer watch` reads the table: into kept buffers, narrow, its view reduced as it is read.
        buffers, reducer = pytracer.SockBuffers(), pytracer.ViewReducer(opts)
        prev = pytracer.snapshot(tracer, buffers=buffers, narrow=True, reducer=reducer)
        polls, reads, entries = [], [], 0
        for _ in range(max(1, min(int(line), 100))):
            t0 = time.perf_counter()
            snap = pytracer.snapshot(tracer, buffers=buffers, narrow=True, reducer=reducer)
            report = pytracer.build_report(snap, prev, opts)
            json.dumps(report)
            polls.append(time.perf_counter() - t0)
            reads.append(snap.read_seconds)
            entries = len(snap.socks)
            prev = snap
        rss = rss_kib()
        # Seeding: each time a fresh tracer finds every socket alive now.
        seeds = []
        for _ in range(max(1, min(int(line), 5))):
            with pytracer.Tracer(max_sockets=cap) as fresh:
                t0 = time.perf_counter()
                res = pytracer.seed(fresh, ())
                seeds.append(time.perf_counter() - t0)
        print(json.dumps({"poll_s": polls, "read_s": reads, "map_entries": entries, "rss_kib": rss,
                          "seed_s": statistics.median(seeds), "seed_runs_s": seeds,
                          "seeded": res.seeded + res.existed, "seed_failed": res.failed}),
              flush=True)
        sys.stdin.readline()  # hold until told (or EOF / SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
