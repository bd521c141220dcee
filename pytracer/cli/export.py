"""``tracer export``: the Prometheus exporter sidecar.

Binds first (a busy port fails before anything is loaded into the kernel),
then loads and attaches the programs, then serves until SIGTERM/SIGINT or
``--duration``.  On the way out the server stops, the collector waits for a
scrape in flight, and the tracer detaches every program.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from typing import Any

import click

from pytracer.cli.options import (
    Context,
    FiniteRange,
    check_stop,
    make_tracer,
    max_sockets_option,
    pid_option,
    run,
    service_ports_option,
    services_from,
    threshold_options,
    thresholds_from,
    validate_pids,
)
from pytracer.exporter import ExportError
from pytracer.exporter.collector import DEFAULT_LEAK_INTERVAL, BpfStats, TracerCollector, log
from pytracer.exporter.families import DEFAULT_MAX_COMMS, DEFAULT_TIME_WAIT_TOP, ExportOptions
from pytracer.exporter.web import DEFAULT_LISTEN, ExporterServer, make_registry, make_server
from pytracer.exporter.webconfig import WebConfig, load_web_config


@click.command()
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Address to serve /metrics on.  Loopback by default; ':PORT' means every interface.",
)
@click.option(
    "--web-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="TLS and basic auth, in the Prometheus exporter-toolkit web-config format.",
)
@pid_option
@max_sockets_option
@service_ports_option
@click.option(
    "--max-comms",
    type=click.IntRange(1, 10000),
    default=DEFAULT_MAX_COMMS,
    show_default=True,
    help="Cap on comm label values per metric; the rest are summed into comm=\"other\".",
)
@click.option(
    "--time-wait-top",
    type=click.IntRange(0, 1000),
    default=DEFAULT_TIME_WAIT_TOP,
    show_default=True,
    help="TIME_WAIT destinations exported one by one; the rest are summed as \"other\".",
)
@click.option(
    "--label-addresses",
    is_flag=True,
    help="Label TIME_WAIT destinations with addr:port (default: their rank, top1..topN, so no addresses leak).",
)
@threshold_options
@click.option(
    "--leak-interval",
    type=FiniteRange(0, 3600),
    default=DEFAULT_LEAK_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="Run the leak scan this often in the background (0: during each scrape). Kernel maps are "
    "always read at scrape time.",
)
@click.option(
    "--bpf-stats",
    is_flag=True,
    help="Turn on kernel BPF run-time statistics while running (BPF_ENABLE_STATS; needs CAP_SYS_ADMIN).",
)
@click.option("--duration", type=FiniteRange(0.1, None), default=None, help="Exit after this many seconds.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request and read at debug level.")
@click.pass_obj
@run
def export(
    obj: Context,
    listen: str,
    web_config: str | None,
    pids: tuple[int, ...],
    max_sockets: int,
    max_comms: int,
    time_wait_top: int,
    label_addresses: bool,
    leak_interval: float,
    bpf_stats: bool,
    duration: float | None,
    verbose: bool,
    **kw: Any,
) -> None:
    """Serve Prometheus metrics read from the kernel at scrape time.

    \b
    Examples:
      sudo tracer export                                  # http://127.0.0.1:9808/metrics
      sudo tracer export --pid $(pgrep -o nginx)
      sudo tracer export --service-ports auto,client:5432 # per-service histograms
      sudo tracer export --listen :9808 --web-config /etc/pytracer/web.yml
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="tracer export: %(message)s", stream=sys.stderr
    )
    pids = validate_pids(pids)
    thresholds = dataclasses.asdict(thresholds_from(kw, time_wait_top))
    services = services_from(kw)
    opts = ExportOptions(
        pids=pids, max_comms=max_comms, time_wait_top=time_wait_top, label_addresses=label_addresses
    )
    try:
        web = load_web_config(web_config) if web_config else WebConfig()
        registry = make_registry()
        server = make_server(listen, web, registry)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        _serve(obj, server, registry, opts, thresholds, max_sockets, bpf_stats, duration, leak_interval,
               services)
    finally:
        server.server_close()


def _serve(obj: Context, server: ExporterServer, registry, opts: ExportOptions,
           thresholds: dict, max_sockets: int, bpf_stats: bool, duration: float | None,
           leak_interval: float, services: tuple | None = None) -> None:
    stats = None
    tracer = make_tracer(obj, opts.pids, max_sockets, services)
    with tracer:
        if bpf_stats:
            try:
                stats = BpfStats()
            except ExportError as exc:
                log.warning("%s; continuing without", exc)
        seed_failed = _seed(tracer, opts.pids)
        collector = TracerCollector(tracer, opts, thresholds=thresholds, bpf_stats=stats is not None,
                                    leak_interval=leak_interval, seed_failed=seed_failed)
        thread = None
        try:
            collector.start()
            registry.register(collector)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            thread.start()
            hooks = ", ".join(f"{h}={c.kind}" for h, c in tracer.choices.items() if c.kind)
            scope = "pids " + ",".join(map(str, opts.pids)) if opts.pids else "whole host"
            log.info("serving %s (%s; hooks %s)", server.url, scope, hooks)
            stop = threading.Event()
            deadline = None if duration is None else time.monotonic() + duration
            # Runs until a signal (SIGTERM/SIGINT unwind from here) or --duration.
            while not stop.is_set():
                check_stop()
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    break
                stop.wait(left)
        finally:
            # Order matters: no scrape or scan may touch the maps once the
            # tracer closes them (leaving the `with`).
            if thread is not None:
                left = server.stop()
                if left:
                    log.warning("stopping: %d scrape(s) still under way after 5 s are cut short", left)
            collector.close()
            if stats is not None:
                stats.close()
            log.info("stopped after %d scrape(s); detaching", collector.scrapes)


def _seed(tracer, pids: tuple[int, ...]) -> int:
    """Put the sockets that already exist into the kernel table (pytracer.inventory.seed),
    so pytracer_sockets counts them from the first scrape.  Returns how many did not fit."""
    try:
        from pytracer.inventory.seed import seed  # noqa: PLC0415 - optional layer
    except ImportError:
        log.info("leak detection layer not installed: pre-existing sockets are not seeded")
        return 0
    try:
        res = seed(tracer, pids)
    except Exception as exc:  # noqa: BLE001 - seeding is best effort; the tracer still runs
        log.warning("seeding pre-existing sockets failed: %s", exc)
        return 0
    log.info("%s (%.2fs)", res.summary(), res.seconds)
    for err in res.errors[:5]:
        log.warning("seeding: %s", err)
    return int(res.failed)
