"""`tracer run -- CMD` on the real kernel: real programs under it (an HTTP
client against a real nginx, a runner that forks workers, a daemon left
behind), judged against what those programs report about themselves (their
pids, fds, ports) and `ss`; exit codes; nothing left attached on any exit
path, kill -9 included (bpftool's program list as the witness)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from pytracer.kernel import hooks

from .conftest import IN_VM, gone, live_prog_ids, prog_ids_of, tracer_cmd
from .leaky_support import Nginx, ss, wait_until

pytest_plugins = ["tests.kernel.conftest_leaks"]

PROGRAMS = str(Path(__file__).with_name("run_programs.py"))
TIMEOUT = 600 if IN_VM else 60
FAST = ["--close-wait-after", "1", "--interval", "0.3"]
HOLD = "15" if IN_VM else "3"  # seconds a leak is held: several scans past the threshold


def tracer_run(*args: str, timeout: float = TIMEOUT, attach: str | None = None,
               **kw: Any) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    if attach:
        env["PYTRACER_ATTACH"] = attach
    return subprocess.run([*tracer_cmd(), "run", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def program(*args: str) -> list[str]:
    return ["--", sys.executable, PROGRAMS, *args]


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def report_of(tmp_path: Path, *args: str, attach: str | None = None) -> tuple[subprocess.CompletedProcess,
                                                                             dict[str, Any]]:
    path = tmp_path / "run.json"
    r = tracer_run("--report", str(path), *args, attach=attach)
    assert path.exists(), r.stderr
    return r, json.loads(path.read_text())


# --- leaks, attributed ---------------------------------------------------------------


def test_http_client_that_never_closes_responses_fails_and_the_fixed_one_passes(
        nginx: Callable[..., Nginx], tmp_path: Path) -> None:
    ng = nginx("127.0.0.1", None, keepalive=1)
    r, rep = report_of(tmp_path, *FAST, "--junit", str(tmp_path / "j.xml"),
                       *program("http", str(ng.port), "4", "--hold", "3.5"))
    assert r.returncode == 1, r.stdout + r.stderr
    client = lines(r.stdout)
    pid = client[-1]["pid"]
    comm = client[-1]["comm"]
    assert client[-1] == {"event": "done", "leaked": 4, "pid": pid, "comm": comm}
    cw = [f for f in rep["flags"] if f["kind"] == "close_wait"]
    # Named as the program it became, not the tracer's child it was before exec.
    assert {f["comm"] for f in cw} == {comm} and all("run_programs.py http" in f["cmdline"] for f in cw)
    # Every leaked connection, held by the client, towards nginx's port.
    assert len(cw) == 4, rep["flags"]
    assert {f["pid"] for f in cw} == {pid}
    assert {f["rport"] for f in cw} == {ng.port}
    assert len({f["fd"] for f in cw}) == 4 and all(f["fd"] >= 3 for f in cw)
    assert all(1.0 <= f["seconds"] <= 4.0 for f in cw), cw
    # Flags print on stderr while it runs, in the leaks table format.
    assert "tracer: flagged:" in r.stderr and "close_wait" in r.stderr and "KIND" in r.stderr
    assert rep["opened"]["active"] == 4 and rep["exit_code"] == 0 and rep["verdict"] == 1
    assert "FAILED: flagged close_wait" in r.stdout
    junit = (tmp_path / "j.xml").read_text()
    assert '<testcase classname="tracer.run.leaks" name="close_wait"' in junit and "<failure" in junit

    r, rep = report_of(tmp_path, *FAST, *program("http", str(ng.port), "4", "--fixed", "--hold", "3.5"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert rep["flags"] == [] and "passed" in r.stdout
    # Four connections, opened and closed by the client itself.
    assert rep["opened"]["active"] == 4 and rep["closed"]["active"] == 4
    assert rep["lifetime"]["count"] == 4


def follow_kind(attach: str | None) -> str:
    """The fork hook's kind for a forced mode, or the one auto picks (the VM
    matrix runs these tests under every PYTRACER_ATTACH and PYTRACER_BACKEND)."""
    mode = attach or os.environ.get("PYTRACER_ATTACH")
    if mode in hooks.FORCED:
        return hooks.FORCED[mode]["follow"]
    return "tracepoint" if os.environ.get("PYTRACER_BACKEND") == "bcc" else "tp_btf"


# tp_btf (the default here) and the classic tracepoint twins (forced).
@pytest.mark.parametrize("attach", [None, "tracepoint"], ids=["auto", "tracepoint"])
def test_leak_in_a_grandchild_is_attributed_to_the_grandchild(tmp_path: Path, attach: str | None) -> None:
    r, rep = report_of(tmp_path, *FAST, *program("tree", "--hold", HOLD), attach=attach)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"follow={follow_kind(attach)}" in r.stderr, r.stderr
    out = lines(r.stdout)
    runner = next(e["pid"] for e in out if e["event"] == "runner")
    leaked = next(e for e in out if e["event"] == "leaked")
    assert leaked["pid"] != runner
    (flag,) = [f for f in rep["flags"] if f["kind"] == "close_wait"]
    assert (flag["pid"], flag["fd"], flag["lport"]) == (leaked["pid"], leaked["fd"], leaked["lport"])
    assert rep["tree"]["followed"] >= 2  # the worker and the grandchild (python may fork more)
    assert rep["tree"]["alive"] == 0


def test_daemon_left_behind_is_reported_holding_its_listener(tmp_path: Path) -> None:
    r, rep = report_of(tmp_path, *FAST, *program("daemon", "--hold", "30"))
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        d = lines(r.stdout)[-1]
        # Ground truth: ss sees the daemon's listener.
        assert any(row.state == "LISTEN" and row.lport == d["port"] for row in ss(None, d["port"]))
        (p,) = [p for p in rep["outlived"] if p["pid"] == d["pid"]]
        assert [(s["state"], s["lport"], s["fd"]) for s in p["sockets"]] == [("LISTEN", d["port"], d["fd"])]
        assert "processes that outlived the command: 1" in r.stdout and f":{d['port']}" in r.stdout
    finally:
        for p in rep["outlived"]:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_listener_stays_watched_after_the_process_that_opened_it_exits(tmp_path: Path) -> None:
    """A daemon listens, forks and leaves; its child serves on the listener
    it inherited.  The connections it accepts are the tree's: counted against
    the command's own connections and the server's own count of them."""
    n = 5
    r, rep = report_of(tmp_path, *FAST, *program("inherit", str(n)))
    assert r.returncode == 0, r.stdout + r.stderr
    (done,) = [e for e in lines(r.stdout) if e["event"] == "served"]
    assert done["served"] == n and done["opener"] != done["server"]
    assert rep["opened"] == {"active": n, "passive": n}, rep["opened"]
    assert rep["closed"] == {"active": n, "passive": n}, rep["closed"]


# --- exit codes ----------------------------------------------------------------------


def test_command_failure_wins_and_fail_on_changes_the_verdict() -> None:
    # Each run leaks one CLOSE_WAIT socket for 3 s (flagged after 1 s).
    r = tracer_run(*FAST, *program("tree", "--hold", "3", "--exit", "3"))
    assert r.returncode == 3 and "close_wait" in r.stdout, r.stdout
    for fail_on, code in (("none", 0), ("idle_established,fd_exhaustion", 0), ("all", 1)):
        r = tracer_run(*FAST, "--fail-on", fail_on, *program("tree", "--hold", "3"))
        assert r.returncode == code, (fail_on, r.stdout)
        if code == 0:
            assert "passed (flagged, not failing: close_wait)" in r.stdout, r.stdout
    assert tracer_run("--", "false").returncode == 1
    assert tracer_run("--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM


@pytest.mark.parametrize("args,says", [
    (["--fail-on", "close_wiat"], "unknown flag kind close_wiat"),
    (["--user", "no-such-user-pt"], "no such user"),
    (["--report", "/nonexistent/dir/r.json"], "--report: cannot write"),
    (["--close-wait-after", "-1"], "--close-wait-after"),
])
def test_bad_input_is_one_line_exit_2_and_the_command_never_runs(tmp_path: Path, args: list[str],
                                                                 says: str) -> None:
    marker = tmp_path / "ran"
    r = tracer_run(*args, "--", "touch", str(marker))
    assert r.returncode == 2, r.stderr
    assert says in r.stderr, r.stderr
    if not args[0].startswith("--close"):  # click's own range check prints its usage lines
        assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not marker.exists()


def test_missing_command_is_one_line_exit_2() -> None:
    r = tracer_run("--", "/nonexistent/cmd")
    assert r.returncode == 2 and "command not found" in r.stderr and r.stderr.strip().count("\n") == 0


def test_unloadable_tracer_exits_2_and_never_starts_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    env = {**os.environ, "PYTRACER_ATTACH": "kprobe"}
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
        pytest.skip("this kernel has kprobes")
    r = subprocess.run([*tracer_cmd(), "run", "--", "touch", str(marker)], capture_output=True, text=True,
                       timeout=TIMEOUT, env=env)
    assert r.returncode == 2 and "kprobes unavailable" in r.stderr, r.stderr
    assert not marker.exists()


def test_command_runs_as_the_requested_user(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    r = tracer_run("--user", "nobody", "--", "id", "-u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(nobody.pw_uid)
    env = {**os.environ, "SUDO_USER": "nobody"}
    r = subprocess.run([*tracer_cmd(), "run", "--", "id", "-u"], capture_output=True, text=True, timeout=TIMEOUT,
                       env=env)
    assert r.stdout.splitlines()[0] == str(nobody.pw_uid)


# --- signals and leftovers -------------------------------------------------------------


def _start(*args: str) -> tuple[subprocess.Popen, set[int], int]:
    """A `tracer run` of a sleeper, once attached: (process, its prog ids, the command's pid)."""
    p = subprocess.Popen([*tracer_cmd(), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()  # type: ignore[union-attr]
    assert line.startswith("tracer: attached"), line
    cmd_pid = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
    ids = prog_ids_of(p.pid)
    assert len(ids) >= 3, ids  # state, fork, exit at least
    assert ids <= live_prog_ids()
    return p, ids, cmd_pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_nothing_left_attached_after_a_normal_exit() -> None:
    p, ids, _ = _start("--", "sleep", "1")
    p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0
    assert gone(ids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_go_to_the_command_then_the_tracer_detaches(sig: signal.Signals) -> None:
    p, ids, cmd = _start("--", "sleep", "30")
    t0 = time.monotonic()
    p.send_signal(sig)
    out, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 128 + sig, out  # sleep died of the forwarded signal
    assert time.monotonic() - t0 < 10
    assert not _alive(cmd)
    assert f"exited {128 + sig}" in out
    assert gone(ids)


def test_kill_9_of_the_tracer_leaves_nothing_attached_and_stops_the_command() -> None:
    p, ids, cmd = _start("--", "sleep", "30")
    p.kill()
    p.wait(timeout=TIMEOUT)
    # The kernel frees programs when their last fd and link go (deferred a moment).
    wait_until(lambda: not (ids & live_prog_ids()), 10, "programs to be released")
    # The command is not left running untraced: it got SIGTERM with its parent.
    wait_until(lambda: not _alive(cmd), 10, "the command to stop")
