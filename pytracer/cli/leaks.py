"""``tracer leaks``: a one-shot leak report.  Exit 0: nothing flagged; 1: flagged; 2: error."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from pytracer.cli.options import (
    Context,
    FiniteRange,
    exit_codes,
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
from pytracer.views.leaks import render_text

EXIT_FLAGGED = 1


# --- the command ---------------------------------------------------------------------


@click.command()
@pid_option
@threshold_options
@click.option("--samples", type=click.IntRange(1, 10000), default=1, show_default=True,
              help="Scans to take, --interval apart; CLOSE_WAIT growth needs --growth-polls + 1.")
@click.option("--interval", type=FiniteRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between samples.")
@click.option("--top", type=click.IntRange(1, 10000), default=10, show_default=True,
              help="TIME_WAIT destinations listed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@max_sockets_option
@service_ports_option
@click.pass_obj
@exit_codes
@run
def leaks(obj: Context, pids: tuple[int, ...], samples: int, interval: float, top: int, as_json: bool,
          max_sockets: int, **kw: Any) -> None:
    """Report leaking TCP sockets: who holds them, on which fd, for how long.

    Flags CLOSE_WAIT sockets a process never closed (or never accepted), idle
    keep-alive connections, FIN_WAIT2 orphans and stuck LAST_ACK sockets,
    processes whose CLOSE_WAIT count keeps growing or whose fds near
    RLIMIT_NOFILE, and destinations whose TIME_WAIT sockets use up the
    ephemeral ports.  Sockets older than the tracer are included; their time
    in state is a lower bound, shown as ">=".  Across samples, services
    whose connections are reset after one idle time (idle_reset: a NAT or
    firewall forgetting idle flows) are flagged with that time and the fix.

    Exit status: 0 nothing flagged, 1 something flagged, 2 error.

    \b
    Examples:
      sudo tracer leaks
      sudo tracer leaks --pid $(pgrep -o nginx) --idle-after 60
      sudo tracer leaks --samples 5 --interval 2 --json   # growth trends too
      sudo tracer leaks --service-ports client:5432 --samples 60   # idle resets to port 5432
    """
    pids = validate_pids(pids)
    thresholds = thresholds_from(kw, top)
    preload_leaks()
    tracer = make_tracer(obj, pids, max_sockets, services_from(kw))
    start_ns = time.monotonic_ns()
    with tracer:
        from pytracer.inventory.seed import seed  # preloaded while attaching
        from pytracer.leaks.scanner import Scanner
        from pytracer.table import poll as poller
        from pytracer.table import reads
        from pytracer.table.health import FillTracker, failed_inserts

        sr = seed(tracer, pids)
        scanner = Scanner(tracer, thresholds, pids=pids)
        rep = scanner.scan()
        # Bounded by --samples.
        for _ in range(samples - 1):
            time.sleep(interval)
            rep = scanner.scan()
        # Sockets the table could not take (seeding's included) were not scanned as candidates.
        # Counted a chunk at a time: the table is never held whole (15 MB at 100k).
        table = FillTracker(start_ns).update(time.monotonic_ns(), reads.count_socks(tracer)[1],
                                             tracer.capacity, failed_inserts(poller.read_totals(tracer)) + sr.failed)
    warnings = [w for w in (table.warning(),) if w]
    if not rep.stats.get("netns_covered"):
        raise click.ClickException("could not read the TCP socket inventory: " + ("; ".join(rep.errors) or "?"))
    scope = "pids " + ",".join(map(str, pids)) if pids else "whole host"
    if as_json:
        out = rep.to_json()
        out["seed"] = sr.to_json()
        out["thresholds"] = dict(thresholds.__dict__)
        out["table"] = {"entries": table.entries, "capacity": table.capacity, "insert_failed": table.failed_total,
                        **table.to_json()}
        out["warnings"] = warnings
        click.echo(json.dumps(out, separators=(",", ":")))
    else:
        click.echo("\n".join([*warnings, render_text(rep, sr, scope)]))
    sys.stdout.flush()
    if rep.flags:
        sys.exit(EXIT_FLAGGED)
