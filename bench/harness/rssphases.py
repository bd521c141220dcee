"""Where `tracer watch`'s peak RSS comes from: its stages run in-process, in
order, through pytracer's public API, with a thread sampling VmRSS every 2 ms
and charging each sample to the stage running then.

    PYTHONPATH=. /opt/pytracer/venv/bin/python bench/harness/rssphases.py [--tracemalloc]

The table is read as `tracer watch` reads it (narrow, with the view's
counts and top-N lists reduced as it is read: ``pytracer.ViewReducer``).
Prints, per stage, RSS at its start and its peak (MiB); with --tracemalloc,
traced Python memory and what stays.  (An earlier --stages mode split the
leak scans by step by wrapping internal functions; the public API has no
such hooks, so it is gone: see bench/notes.md.)
"""

from __future__ import annotations

import json
import sys
import threading
import time

stage = ["start"]
peaks: dict[str, list[float]] = {}
stop = threading.Event()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def sampler() -> None:
    while not stop.is_set():
        r = rss_mib()
        cur = stage[0]
        p = peaks.setdefault(cur, [r, r])
        p[1] = max(p[1], r)
        time.sleep(0.002)


def enter(name: str) -> None:
    stage[0] = name
    r = rss_mib()
    peaks.setdefault(name, [r, r])


def main() -> int:
    trace = "--tracemalloc" in sys.argv
    threading.Thread(target=sampler, daemon=True).start()
    enter("import pytracer")
    import pytracer

    pytracer.tune_malloc()  # as the CLI does at start
    tracer_cls = pytracer.Tracer  # resolving the name imports the loader

    enter("load+attach")
    with tracer_cls(max_sockets=262144) as tracer:
        enter("resolve seed/report/poll")
        seed, snapshot, build_report = pytracer.seed, pytracer.snapshot, pytracer.build_report

        enter("seed")
        res = seed(tracer)
        enter("poll x3")
        buffers = pytracer.SockBuffers()
        opts = pytracer.ReportOptions(top=0, start_mono_ns=time.monotonic_ns(), max_sockets=262144)
        # As `tracer watch` reads the table: narrow, its view reduced as it is read.
        reducer = pytracer.ViewReducer(opts)
        prev = snapshot(tracer, buffers=buffers, narrow=True, reducer=reducer)
        for _ in range(3):
            snap = snapshot(tracer, buffers=buffers, narrow=True, reducer=reducer)
            report = build_report(snap, prev, opts)
            json.dumps(report)
            prev = snap
        enrich = pytracer.watch_enricher(pytracer.Thresholds())
        state: dict = {}
        if trace:
            import tracemalloc

            tracemalloc.start(8)
        for i in range(2):
            enter(f"leak scan {i + 1}")
            report = build_report(snap, prev, opts)
            if "leak_cycle" in state:
                state["leak_cycle"].last = None  # a scan each time, whatever the duty cycle says
            enrich(report, snap, tracer, opts, state)
            json.dumps(report)
        if trace:
            top = tracemalloc.take_snapshot().statistics("lineno")[:12]
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        enter("idle")
        time.sleep(0.05)
    stop.set()
    print(f"seeded {res.seeded + res.existed} with owner {res.with_owner}")
    for name, (first, peak) in peaks.items():
        print(f"{name:<26} start {first:7.1f} MiB  peak {peak:7.1f} MiB")
    if trace:
        print(f"tracemalloc peak during the leak scans: {traced_peak / 2**20:.1f} MiB; live after them:")
        for st in top:
            print(f"  {st.size / 2**20:6.2f} MiB  {st.traceback[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
