"""The lines ``tracer destroy`` prints and logs.  Pure."""

from __future__ import annotations

from pytracer.leaks.destroy import ENDED, SKIPPED, Outcome, Plan, Run
from pytracer.leaks.detectors import Flag
from pytracer.leaks.report import LeakReport
from pytracer.views.destroy import CLOSE_WAIT_NOTE, outcome_line, render_plan, render_summary, socket_line


def idle() -> Flag:
    return Flag(kind="idle_established", cookie=0x1F3, pid=1234, comm="nginx", fd=7, state="ESTABLISHED",
                seconds=30.0, idle_seconds=720.0, laddr="10.0.0.1", lport=8080, raddr="10.0.0.2", rport=51234,
                family="ipv4", held_by="fd", at_least=True, netns=4026531840)


def backlog() -> Flag:
    return Flag(kind="close_wait", cookie=9, pid=99, comm="app", state="CLOSE_WAIT", seconds=75.0, laddr="fd00::1",
                lport=443, raddr="fd00::2", rport=50000, family="ipv6", held_by="backlog", at_least=True,
                netns=1, extra={"listener_fd": 3})


def test_socket_line() -> None:
    assert socket_line(idle()) == ("tcp 10.0.0.1:8080 10.0.0.2:51234 ESTABLISHED pid=1234 comm=nginx fd=7 "
                                   "idle=12.0m netns=4026531840 cookie=0x1f3")
    assert socket_line(backlog()) == ("tcp [fd00::1]:443 [fd00::2]:50000 CLOSE_WAIT pid=99 comm=app fd=- unaccepted "
                                      "listener_fd=3 age=>=75s netns=1 cookie=0x9")
    orphan = Flag(kind="fin_wait2_orphan", cookie=1, state="FIN_WAIT2", seconds=61.0, laddr="10.0.0.2", lport=1,
                  raddr="10.0.0.1", rport=2, netns=5)
    assert "pid=- comm=- fd=- age=61s" in socket_line(orphan)


def test_outcomes_and_summary() -> None:
    run = Run(Plan([idle(), backlog()], matched=5, listeners_left=1), LeakReport(errors=["netns x: gone"]))
    run.outcomes = [Outcome(idle(), ENDED), Outcome(backlog(), SKIPPED, "now CLOSED, was CLOSE_WAIT")]
    assert outcome_line(run.outcomes[0]).startswith("ended tcp 10.0.0.1:8080 ")
    assert outcome_line(run.outcomes[1]).endswith("cookie=0x9 (now CLOSED, was CLOSE_WAIT)")
    dry = render_plan(run, "kind close_wait", acting=False).splitlines()
    assert dry[0] == "tracer destroy: kind close_wait; 5 sockets match, the oldest 2 taken (--max)"
    assert dry[1] == "would end " + socket_line(idle())
    assert "1 listening socket(s) matched and are never ended" in dry
    assert "warning: netns x: gone" in dry
    assert not [x for x in render_plan(run, "k", acting=True).splitlines() if x.startswith("would end")]
    done = render_summary(run, acting=True, refusal=None, close_wait=True)
    assert done.splitlines()[0] == "ended 1, skipped 1 (changed or gone since the scan), failed 0"
    assert CLOSE_WAIT_NOTE in done
    dry_summary = render_summary(run, acting=False, refusal="refusing: no filter", close_wait=False)
    assert "nothing was ended" in dry_summary and "refusing: no filter" in dry_summary
    assert CLOSE_WAIT_NOTE not in dry_summary
