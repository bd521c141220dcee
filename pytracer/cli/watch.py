"""``tracer watch``: the live view of the host's (or some pids') TCP sockets.

Start-up order matters here: the programs are attached first (numpy and
the leak layer load in a background thread meanwhile), then the sockets
that already exist are seeded into the table, and only then does the
"attached" line go to stderr.  Seeding also names the owners of listeners
that predate us in the kernel's "listeners" map; under --pid a child
accepted before that would be filtered out, so "attached" has to mean both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import click

from pytracer.cli.options import (
    Context,
    FiniteRange,
    check_stop,
    make_tracer,
    max_sockets_option,
    pid_option,
    preload_leaks,
    run,
    service_ports_option,
    services_from,
    threshold_options,
    thresholds_from,
    validate_pids,
)

if TYPE_CHECKING:
    from pytracer.kernel.core import Tracer
    from pytracer.table import poll as poller


def intervals(interval: float, duration: float | None, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> Iterator[int]:
    """Sleep to each deadline; yields tick numbers.  Bounded by duration.

    A consumer slower than the interval (a leak scan takes ~16 s at 1M
    sockets) skips the ticks it missed: one report follows at once, not one
    per missed tick back to back.  A stopped process (SIGSTOP) wakes into one
    catch-up report, then back on the grid.
    """
    start = clock()
    n = math.inf if duration is None else max(1, math.ceil(duration / interval - 1e-9))
    i = 0
    while i < n:
        i = int(min(n, max(i + 1, int((clock() - start) / interval))))
        deadline = start + i * interval
        if duration is not None:
            deadline = min(deadline, start + duration)
        delay = deadline - clock()
        if delay > 0:
            sleep(delay)
            # A sleep that overran (the process was stopped: SIGSTOP, a paused VM) wakes
            # into a catch-up report: count it as the current tick, so the next one waits
            # for the grid instead of following at once.
            i = int(min(n, max(i, int((clock() - start) / interval))))
        yield i


def services_enricher(report: dict[str, Any], snap: Any, tracer: Any, opts: Any, state: dict[str, Any]) -> None:
    """Each report's ``services``: per-service lifetime and idle before end
    (one map lookup per service; see pytracer.table.services)."""
    from pytracer.table import services

    # Between connection ends nothing changes: the same objects, their JSON made once.
    read = services.read(tracer, state.setdefault("services_cache", {}))
    if snap is not None:
        snap.services = read  # the leak scan of this interval judges the same read
    stats = [s for s in read if s.ends]
    last = state.get("services_json")
    if last is None or len(last[0]) != len(stats) or any(a is not b for a, b in zip(last[0], stats)):
        last = state["services_json"] = (stats, [s.to_json() for s in stats])
    report["services"] = last[1]


def reports(tracer: Tracer, pids: tuple[int, ...], interval: float, duration: float | None, top: int,
            start_ns: int, enrichers: Iterable[Callable[..., Any]] = (),
            extra: dict[str, Any] | None = None, seed_failed: int = 0,
            ) -> Iterator[tuple[dict[str, Any], poller.Snapshot]]:
    from pytracer.table import poll as poller
    from pytracer.table.health import FillTracker, failed_inserts
    from pytracer.views import model

    opts = model.ReportOptions(pids=pids, top=top, start_mono_ns=start_ns, max_sockets=tracer.capacity,
                               extra=dict(extra or {}))
    prev = None
    state: dict[str, Any] = {}
    # The aggregates every interval, the table as its cost allows.
    # The view's counts and top-N lists are made as the table is read, a chunk at a time.
    table = poller.TablePoller(tracer, reducer=model.ViewReducer(opts))
    view: model.TableView | None = None
    fill = FillTracker(start_ns)
    for _ in intervals(interval, duration):
        check_stop()
        snap = table.poll()
        if view is None or view.table_mono_ns != snap.table_mono_ns:
            # A fresh table: the view's work on it is part of its cost.
            t0 = time.perf_counter()
            view = snap.reduced if isinstance(snap.reduced, model.TableView) else model.table_view(snap, opts)
            table.charge(time.perf_counter() - t0)
        report = model.build_report(snap, prev, opts, view)
        # Sockets the table could not take (seeding's included) are in no count: say so while recent.
        health = fill.update(snap.mono_ns, len(snap.socks), tracer.capacity,
                             failed_inserts(snap.totals) + seed_failed)
        report["tracer"].update(health.to_json())
        report["warnings"] = [w for w in (health.warning(),) if w]
        # Each enricher adds to the report (the leak detectors' flags; they
        # keep their own duty cycle).
        for enrich in enrichers:
            enrich(report, snap, tracer, opts, state)
        yield report, snap
        # The next read reuses snap's table arrays: keep only its totals.
        prev = dataclasses.replace(snap, keys=snap.keys[:0], socks=snap.socks[:0])


@click.command()
@pid_option
@click.option("--interval", type=FiniteRange(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between updates.")
@click.option("--duration", type=FiniteRange(0.05, None), default=None, help="Exit after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per interval, one per line.")
@click.option("--top", type=click.IntRange(0, 10000), default=10, show_default=True, help="Sockets per list.")
@click.option("--no-leaks", is_flag=True, help="Skip the leak scan (sock_diag and /proc) each interval.")
@threshold_options
@max_sockets_option
@service_ports_option
@click.pass_obj
@run
def watch(obj: Context, pids: tuple[int, ...], interval: float, duration: float | None, as_json: bool, top: int,
          no_leaks: bool, max_sockets: int, **kw: Any) -> None:
    """Watch TCP sockets live: states, open/close rates, lifetimes, oldest sockets.

    \b
    Examples:
      sudo tracer watch
      sudo tracer watch --pid $(pgrep -o nginx) --interval 2
      sudo tracer watch --json --duration 30 > sockets.jsonl
      sudo tracer watch --service-ports 80,client:5432   # per-service idle before end
    """
    pids = validate_pids(pids)
    thresholds = thresholds_from(kw)
    preload_leaks()  # seeding needs it even with --no-leaks
    tracer = make_tracer(obj, pids, max_sockets, services_from(kw))
    start_ns = time.monotonic_ns()
    with tracer:
        # Imported once attached (numpy and the leak layer take a moment,
        # preloaded in the background meanwhile).
        from pytracer.inventory.seed import seed
        from pytracer.leaks.cadence import watch_enricher
        from pytracer.views import model

        # Sockets that exist already go into the table as "present at start".
        seeded = seed(tracer, pids)
        # One line on stderr (stdout stays JSON): from here on nothing is missed.
        scope = "pids " + ",".join(map(str, pids)) if pids else "the whole host"
        hooks = " ".join(f"{h}={c.kind}" for h, c in tracer.choices.items() if c.kind)
        click.echo(f"tracer: attached, watching {scope} ({hooks}); {seeded.summary()}", err=True)
        extra = {"seeded": seeded.seeded, "seed_failed": seeded.failed}
        if seeded.skipped:
            extra["seed_skipped"] = seeded.skipped
        enrichers = [services_enricher] + ([] if no_leaks else [watch_enricher(thresholds)])
        stream = reports(tracer, pids, interval, duration, top, start_ns, enrichers, extra, seeded.failed)
        if as_json:
            for line in json_lines(report for report, _ in stream):
                sys.stdout.write(line)
                sys.stdout.flush()
        elif sys.stdout.isatty():
            _live(stream, tracer, pids)
        else:
            from pytracer.views.text import plain

            for report, snap in stream:
                print(plain(report, model.lifetime_all(snap.totals)), flush=True)


_FLAGS_MARK = "\0flags\0"


def json_lines(reports: Iterable[dict[str, Any]]) -> Iterator[str]:
    """One JSON line per report.  Reports between two leak scans share one
    list of flags (thousands, in a leak pile): it is encoded once per scan
    and spliced into each line, not encoded again every interval."""
    last: tuple[list[Any], str] | None = None
    mark = json.dumps(_FLAGS_MARK)
    for report in reports:
        flags = report.get("flags")
        if not isinstance(flags, list) or not flags:
            yield json.dumps(report, separators=(",", ":")) + "\n"
            continue
        if last is None or last[0] is not flags:
            last = (flags, json.dumps(flags, separators=(",", ":")))
        line = json.dumps({**report, "flags": _FLAGS_MARK}, separators=(",", ":"))
        yield line.replace(mark, last[1], 1) + "\n"


def _live(stream: Iterator[tuple[dict[str, Any], poller.Snapshot]], tracer: Tracer, pids: tuple[int, ...]) -> None:
    from rich.console import Console
    from rich.live import Live

    from pytracer.views import model
    from pytracer.views.live import render

    hooks = ", ".join(f"{h}={c.kind}" for h, c in tracer.choices.items() if c.kind)
    scope = "pids " + ",".join(map(str, pids)) if pids else "whole host"
    header = f"pytracer: {scope} | hooks {hooks} | Ctrl-C to quit"
    console = Console()
    with Live(console=console, auto_refresh=False, screen=False, transient=False) as live:
        for report, snap in stream:
            live.update(render(report, model.lifetime_all(snap.totals), header), refresh=True)
