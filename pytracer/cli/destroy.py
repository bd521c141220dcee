"""``tracer destroy``: end stuck TCP sockets on purpose (a dry run unless --yes).

Exit 0: dry run, or every chosen socket ended or left alone because it
changed; 1: a socket could not be ended; 2: error or refusal.
"""

from __future__ import annotations

import sys
import syslog
from typing import Any

import click

from pytracer.cli.options import pid_option, run, socket_threshold_options, thresholds_from, validate_pids
from pytracer.leaks.destroy import (
    DESTROY_KINDS,
    DESTROY_STATES,
    ENDED,
    FAILED,
    KIND_THRESHOLDS,
    VIAS,
    DestroyRefused,
    Outcome,
    choose,
    end,
    refusal,
)
from pytracer.views.destroy import outcome_line, render_plan, render_summary

EXIT_FAILED = 1
EXIT_ERROR = 2


def _fail(message: str) -> click.ClickException:
    exc = click.ClickException(message)
    exc.exit_code = EXIT_ERROR
    return exc


def _threshold_given(ctx: click.Context, kind: str | None) -> bool:
    if kind is None:
        return False
    source = ctx.get_parameter_source(KIND_THRESHOLDS[kind])
    return source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def _selection(kind: str | None, state: str | None, th: Any, pids: tuple[int, ...], port: int | None) -> str:
    if kind:
        limit = getattr(th, KIND_THRESHOLDS[kind])
        text = f"kind {kind} ({KIND_THRESHOLDS[kind]} {'tcp_fin_timeout' if limit is None else f'{limit:g}s'})"
    else:
        text = f"state {state}"
    if pids:
        text += ", pid " + ",".join(map(str, pids))
    if port is not None:
        text += f", port {port}"
    return text


def _log(o: Outcome) -> None:
    """One socket's outcome on stderr; an ended (or failed) one in syslog too (owner and age are in the line)."""
    line = outcome_line(o)
    click.echo(line, err=True)
    if o.result in (ENDED, FAILED):
        syslog.syslog(syslog.LOG_NOTICE if o.result == ENDED else syslog.LOG_WARNING, line)


@click.command()
@click.option("--kind", type=click.Choice(DESTROY_KINDS),
              help="End the sockets `tracer leaks` flags with this kind (same thresholds).")
@click.option("--state", "state", metavar="STATE",
              help="Instead of --kind: every socket in this TCP state (e.g. CLOSE_WAIT) held by --pid or on "
                   "--port; never LISTEN.")
@pid_option
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Only sockets with this port at either end.")
@socket_threshold_options
@click.option("--max", "max_sockets", type=click.IntRange(1, 100000), default=100, show_default=True,
              help="End at most this many sockets per run (the oldest first).")
@click.option("--yes", is_flag=True, help="Do it. Without --yes, only list what would be ended.")
@click.option("--host-wide", is_flag=True,
              help="With --yes and no --pid or --port: act on every process of the host (needs the kind's "
                   "threshold given explicitly).")
@click.option("--via", type=click.Choice(VIAS), default="sock_diag", show_default=True,
              help="How: SOCK_DESTROY over sock_diag netlink, or bpf_sock_destroy() from an iter/tcp program "
                   "(v6.5+; full sockets only).")
@click.pass_context
@run
def destroy(ctx: click.Context, kind: str | None, state: str | None, pids: tuple[int, ...], port: int | None,
            max_sockets: int, yes: bool, host_wide: bool, via: str, **kw: Any) -> None:
    """End stuck TCP sockets (SOCK_DESTROY over sock_diag). A dry run unless --yes.

    Chooses exactly the sockets `tracer leaks` flags with --kind under the
    same thresholds (or every socket in --state of a --pid or --port), and
    prints one line per socket: 5-tuple, state, owner pid, comm and fd, age.
    With --yes each one is looked up again (4-tuple and cookie: same socket,
    same state, still idle) and ended: the peer gets a RST, the owner gets
    ECONNABORTED on its next call.  Works in every network namespace.

    Safety: listeners are never ended; at most --max sockets per run; --yes
    refuses without --pid or --port (every process of the host takes the
    kind's threshold given explicitly and --host-wide); every socket ended
    is logged to stderr and syslog.  Ending
    a CLOSE_WAIT socket frees the connection and its port, not the
    application's leaked fd.

    Exit status: 0 done (or dry run), 1 a socket could not be ended, 2 error or refusal.

    \b
    Examples:
      sudo tracer destroy --kind idle_established --idle-after 600          # dry run
      sudo tracer destroy --kind idle_established --idle-after 600 --port 8080 --yes
      sudo tracer destroy --kind close_wait --pid $(pgrep -o myapp) --yes
      sudo tracer destroy --kind fin_wait2_orphan --fin-wait2-after 30 --max 20 --host-wide --yes
      sudo tracer destroy --state CLOSE_WAIT --port 5432
      sudo tracer destroy --kind idle_established --idle-after 600 --pid 1234 --via bpf --yes
    """
    if (kind is None) == (state is None):
        raise click.UsageError("give exactly one of --kind or --state")
    if state is not None:
        state = state.upper().replace("-", "_")
        if state not in DESTROY_STATES:
            raise click.BadParameter(f"{state!r} is not one of {', '.join(DESTROY_STATES)} (listeners are never "
                                     "ended)", param_hint="--state")
    pids = validate_pids(pids)
    th = thresholds_from(kw)
    why_not = refusal(kind, pids, port, _threshold_given(ctx, kind), host_wide)
    if yes and why_not:
        raise _fail(why_not)
    selection = _selection(kind, state, th, pids, port)
    r = choose(kind, th, pids, port, max_sockets, state)
    if not r.report.stats.get("netns_covered"):
        raise _fail("could not read the TCP socket inventory: " + ("; ".join(r.report.errors) or "?"))
    click.echo(render_plan(r, selection, yes))
    if yes:
        syslog.openlog("tracer-destroy", syslog.LOG_PID, syslog.LOG_USER)
        try:
            end(r, th, _log, via)
        except DestroyRefused as exc:
            raise _fail(str(exc)) from None
        finally:
            syslog.closelog()
    click.echo(render_summary(r, yes, why_not, kind == "close_wait" or state == "CLOSE_WAIT"))
    sys.stdout.flush()
    if yes and r.count(FAILED):
        sys.exit(EXIT_FAILED)
