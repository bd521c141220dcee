"""The text of ``tracer destroy``: one line per socket (the dry run's list,
and the log line of each socket ended), and the run's summary.  Pure.

A socket's line is the same in the dry run, on stderr and in syslog, so a
log can be matched against the list that preceded it::

    tcp 10.0.0.1:8080 10.0.0.2:51234 ESTABLISHED pid=1234 comm=nginx fd=7 idle=12m netns=4026531840 cookie=0x1f3
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytracer.format import duration, endpoint

if TYPE_CHECKING:
    from pytracer.leaks.destroy import Outcome, Run
    from pytracer.leaks.detectors import Flag

CLOSE_WAIT_NOTE = (
    "note: ending a CLOSE_WAIT socket frees the connection and its port, but not the application's leaked file "
    "descriptor: a process that holds one (fd= above) keeps it, now of a closed socket, until it calls close() "
    "itself; the fix is the missing close() in the application."
)


def _age(f: Flag) -> str:
    if f.kind == "idle_established":
        return f"idle={duration(f.idle_seconds)}"
    if f.seconds is None:
        return "age=-"
    return "age=" + (">=" if f.at_least else "") + duration(f.seconds)


def socket_line(f: Flag) -> str:
    """5-tuple, state, owner (pid, comm, fd), age, namespace and cookie, as key=value after the tuple."""
    local = endpoint(f.laddr or "?", f.lport or 0)
    remote = endpoint(f.raddr or "?", f.rport or 0)
    owner = f"pid={f.pid if f.pid is not None else '-'} comm={f.comm or '-'} fd={f.fd if f.fd is not None else '-'}"
    if f.held_by == "backlog":
        owner += " unaccepted"
        if f.extra.get("listener_fd") is not None:
            owner += f" listener_fd={f.extra['listener_fd']}"
    netns = f.netns if f.netns is not None else "-"
    cookie = f"{f.cookie:#x}" if f.cookie is not None else "-"
    return f"tcp {local} {remote} {f.state} {owner} {_age(f)} netns={netns} cookie={cookie}"


def outcome_line(o: Outcome) -> str:
    return f"{o.result} {socket_line(o.flag)}" + (f" ({o.reason})" if o.reason else "")


def render_plan(run: Run, selection: str, acting: bool) -> str:
    """The dry run's list (or, with ``acting``, the header before the log lines)."""
    p = run.plan
    lines = [f"tracer destroy: {selection}; {p.matched} socket{'s' if p.matched != 1 else ''} match"
             + (f", the oldest {len(p.targets)} taken (--max)" if p.matched > len(p.targets) else "")]
    if not acting:
        lines += [f"would end {socket_line(f)}" for f in p.targets]
    if p.listeners_left:
        lines.append(f"{p.listeners_left} listening socket(s) matched and are never ended")
    for e in run.report.errors:
        lines.append(f"warning: {e}")
    return "\n".join(lines)


def render_summary(run: Run, acting: bool, refusal: str | None, close_wait: bool) -> str:
    from pytracer.leaks.destroy import ENDED, FAILED, SKIPPED

    lines = []
    if acting:
        lines.append(f"ended {run.count(ENDED)}, skipped {run.count(SKIPPED)} (changed or gone since the scan), "
                     f"failed {run.count(FAILED)}")
    elif run.plan.targets:
        lines.append("dry run: nothing was ended; add --yes to end these sockets"
                     + (f" (but --yes would refuse: {refusal})" if refusal else ""))
    else:
        lines.append("nothing to end")
    if close_wait and run.plan.targets:
        lines.append(CLOSE_WAIT_NOTE)
    return "\n".join(lines)
