"""``tracer destroy``'s refusals, before it reads anything, and its log line.  No kernel."""

from __future__ import annotations

import syslog
from typing import Any

from click.testing import CliRunner

from pytracer.cli import cli
from pytracer.cli import destroy as cmd
from pytracer.leaks.destroy import ENDED, Outcome
from pytracer.leaks.detectors import Flag


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["destroy", *args])


def test_refuses_to_act_without_a_filter(monkeypatch: Any) -> None:
    monkeypatch.setattr(cmd, "choose", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scanned")))
    res = run("--kind", "close_wait", "--yes")
    assert res.exit_code == 2
    assert "refusing to end sockets without a filter" in res.output
    assert "--close-wait-after" in res.output


def test_bad_selections() -> None:
    assert run("--state", "LISTEN", "--port", "80").exit_code == 2
    assert "never ended" in run("--state", "LISTEN", "--port", "80").output
    assert run("--kind", "close_wait", "--state", "CLOSE_WAIT").exit_code == 2
    assert run("--port", "80").exit_code == 2
    assert run("--kind", "time_wait_pressure").exit_code == 2  # not a socket kind


def test_an_ended_socket_is_logged_to_stderr_and_syslog(monkeypatch: Any, capsys: Any) -> None:
    logged: list[tuple[int, str]] = []
    monkeypatch.setattr(syslog, "syslog", lambda prio, msg: logged.append((prio, msg)))
    f = Flag(kind="close_wait", cookie=1, pid=7, comm="app", fd=4, state="CLOSE_WAIT", seconds=90.0, laddr="1.2.3.4",
             lport=1, raddr="5.6.7.8", rport=2, netns=1)
    cmd._log(Outcome(f, ENDED))
    err = capsys.readouterr().err
    assert err.startswith("ended tcp 1.2.3.4:1 5.6.7.8:2 CLOSE_WAIT pid=7 comm=app fd=4 age=90s")
    assert logged == [(syslog.LOG_NOTICE, err.strip())]
