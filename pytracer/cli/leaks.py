"""``tracer leaks``: a one-shot leak report.  Exit 0: nothing flagged; 1: flagged; 2: error."""

from __future__ import annotations

import functools
import importlib
import json
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import click

from pytracer.cli.common import Context, make_tracer, max_sockets_option, pid_option, run, validate_pids
from pytracer.leaks.thresholds import Thresholds

if TYPE_CHECKING:
    from pytracer.leaks.detectors import Flag
    from pytracer.leaks.scanner import LeakReport
    from pytracer.table.writer import SeedResult

EXIT_FLAGGED = 1
EXIT_ERROR = 2


def threshold_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The detectors' thresholds as options (shared with ``tracer watch``)."""
    d = Thresholds()
    secs = click.FloatRange(0, None)
    ratio = click.FloatRange(0, 1, min_open=True)
    opts = [
        click.option("--close-wait-after", type=secs, default=d.close_wait_after, show_default=True, metavar="S",
                     help="Flag sockets in CLOSE_WAIT longer than S seconds."),
        click.option("--idle-after", type=secs, default=d.idle_after, show_default=True, metavar="S",
                     help="Flag ESTABLISHED sockets with no data either way for S seconds."),
        click.option("--last-ack-after", type=secs, default=d.last_ack_after, show_default=True, metavar="S",
                     help="Flag sockets stuck in LAST_ACK longer than S seconds."),
        click.option("--fin-wait2-after", type=secs, default=None, metavar="S",
                     help="Flag FIN_WAIT2 sockets older than S seconds [default: net.ipv4.tcp_fin_timeout]."),
        click.option("--fd-warn-ratio", type=ratio, default=d.fd_warn_ratio, show_default=True, metavar="R",
                     help="Flag processes using this fraction of RLIMIT_NOFILE."),
        click.option("--time-wait-warn-ratio", type=ratio, default=d.time_wait_warn_ratio, show_default=True,
                     metavar="R", help="Flag destinations whose TIME_WAIT sockets use this fraction of the "
                     "ephemeral port range."),
        click.option("--growth-polls", type=click.IntRange(1, 100), default=d.growth_polls, show_default=True,
                     metavar="N", help="Flag CLOSE_WAIT growth after N polls without a decrease..."),
        click.option("--growth-min", type=click.IntRange(1, None), default=d.growth_min, show_default=True,
                     metavar="N", help="...and a rise of at least N sockets."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


THRESHOLD_KEYS = ("close_wait_after", "idle_after", "last_ack_after", "fin_wait2_after", "fd_warn_ratio",
                  "time_wait_warn_ratio", "growth_polls", "growth_min")


def thresholds_from(kw: dict[str, Any], top: int | None = None) -> Thresholds:
    th = Thresholds(**{k: kw.pop(k) for k in THRESHOLD_KEYS})
    if top is not None:
        th.top = top
    try:
        th.validate()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return th


def preload_leaks() -> threading.Thread:
    """Import the leak layer (pyroute2 takes 0.4 s or more) in the background
    while the BPF programs load and attach; ``import`` waits for it after."""
    t = threading.Thread(target=importlib.import_module, args=("pytracer.leaks.scanner",), name="pytracer-preload",
                         daemon=True)
    t.start()
    return t


def _exit_codes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors exit 2, so 1 always means "something is flagged"."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException as exc:
            exc.exit_code = EXIT_ERROR
            raise

    return wrapper


# --- rendering -------------------------------------------------------------------


def _for(f: Flag) -> str:
    from pytracer.leaks.detectors import human

    if f.seconds is None:
        return "-"
    return (">=" if f.at_least else "") + human(f.seconds)


def _cells(f: Flag) -> list[str]:
    from pytracer.format import endpoint
    from pytracer.leaks.detectors import human

    local = endpoint(f.laddr, f.lport) if f.laddr is not None and f.lport is not None else "-"
    remote = endpoint(f.raddr, f.rport) if f.raddr is not None and f.rport is not None else "-"
    return [
        f.kind,
        str(f.pid) if f.pid is not None else "-",
        f.comm or "-",
        str(f.fd) if f.fd is not None else "-",
        f.state or "-",
        _for(f),
        human(f.idle_seconds) if f.idle_seconds is not None else "-",
        local,
        remote,
        f.held_by or "-",
    ]


HEADERS = ["KIND", "PID", "COMM", "FD", "STATE", "FOR", "IDLE", "LOCAL", "REMOTE", "HELD"]


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render_text(rep: LeakReport, sr: SeedResult | None, scope: str) -> str:
    lines = []
    states = ", ".join(f"{k} {v}" for k, v in sorted(rep.inventory_states.items())) or "none"
    ns = rep.stats.get("netns_covered", 0)
    total = sum(rep.inventory_states.values())
    lines.append(f"tracer leaks: {scope}; {total} TCP sockets in {ns} network "
                 f"namespace{'s' if ns != 1 else ''} ({states})")
    if sr is not None:
        lines.append(sr.summary())
    if not rep.flags:
        lines.append("nothing flagged")
    else:
        lines.append(f"{len(rep.flags)} flagged:")
        rows = [HEADERS, *(_cells(f) for f in rep.flags)]
        table = _table(rows, "  ")
        lines.append(table[0])
        for f, line in zip(rep.flags, table[1:]):
            lines.append(line)
            lines.append(f"      {f.detail}")
            if f.cmdline:
                lines.append(f"      cmdline: {f.cmdline[:200]}")
    if rep.time_wait:
        lines.append("TIME_WAIT by destination (local ports in use / ephemeral range):")
        rows = [[d, str(n), f"/ {r}" if r else "", f"({n / r:.1%})" if r else ""] for d, n, r in rep.time_wait]
        lines.extend(_table(rows, "  "))
    risky = [p for p in rep.processes.values() if p.close_wait or p.close_wait_backlog]
    if risky:
        lines.append("processes with CLOSE_WAIT sockets:")
        rows = [["PID", "COMM", "FDS", "CLOSE_WAIT", "BACKLOG", "GROWTH"]]
        for p in sorted(risky, key=lambda p: -(p.close_wait + p.close_wait_backlog)):
            fds = f"{p.open_fds}/{p.max_fds}" if p.max_fds else str(p.open_fds)
            growth = f"{p.close_wait_per_second * 60:.1f}/min" if p.close_wait_per_second else "-"
            rows.append([str(p.pid), p.comm or "-", fds, str(p.close_wait), str(p.close_wait_backlog), growth])
        lines.extend(_table(rows, "  "))
    for e in rep.errors:
        lines.append(f"warning: {e}")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------


@click.command()
@pid_option
@threshold_options
@click.option("--samples", type=click.IntRange(1, 10000), default=1, show_default=True,
              help="Scans to take, --interval apart; CLOSE_WAIT growth needs --growth-polls + 1.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between samples.")
@click.option("--top", type=click.IntRange(1, 10000), default=10, show_default=True,
              help="TIME_WAIT destinations listed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@max_sockets_option
@click.pass_obj
@_exit_codes
@run
def leaks(obj: Context, pids: tuple[int, ...], samples: int, interval: float, top: int, as_json: bool,
          max_sockets: int, **kw: Any) -> None:
    """Report leaking TCP sockets: who holds them, on which fd, for how long.

    Flags CLOSE_WAIT sockets a process never closed (or never accepted), idle
    keep-alive connections, FIN_WAIT2 orphans and stuck LAST_ACK sockets,
    processes whose CLOSE_WAIT count keeps growing or whose fds near
    RLIMIT_NOFILE, and destinations whose TIME_WAIT sockets use up the
    ephemeral ports.  Sockets older than the tracer are included; their time
    in state is a lower bound, shown as ">=".

    Exit status: 0 nothing flagged, 1 something flagged, 2 error.

    \b
    Examples:
      sudo tracer leaks
      sudo tracer leaks --pid $(pgrep -o nginx) --idle-after 60
      sudo tracer leaks --samples 5 --interval 2 --json   # growth trends too
    """
    pids = validate_pids(pids)
    thresholds = thresholds_from(kw, top)
    preload_leaks()
    tracer = make_tracer(obj, pids, max_sockets)
    with tracer:
        from pytracer.inventory.seed import seed  # pyroute2: imported once attached
        from pytracer.leaks.scanner import Scanner

        sr = seed(tracer, pids)
        scanner = Scanner(tracer, thresholds, pids=pids)
        rep = scanner.scan()
        # Bounded by --samples.
        for _ in range(samples - 1):
            time.sleep(interval)
            rep = scanner.scan()
    if not rep.stats.get("netns_covered"):
        raise click.ClickException("could not read the TCP socket inventory: " + ("; ".join(rep.errors) or "?"))
    scope = "pids " + ",".join(map(str, pids)) if pids else "whole host"
    if as_json:
        out = rep.to_json()
        out["seed"] = sr.to_json()
        out["thresholds"] = dict(thresholds.__dict__)
        click.echo(json.dumps(out, separators=(",", ":")))
    else:
        click.echo(render_text(rep, sr, scope))
    sys.stdout.flush()
    if rep.flags:
        sys.exit(EXIT_FLAGGED)
