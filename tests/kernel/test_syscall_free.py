"""The default plan taxes no syscall, and still names who holds a socket.

Enabling any syscalls:* tracepoint puts every task on the host on the slow
syscall path, so by default no syscall hook is attached (--syscall-hooks opts
in).  Checked against ground truth: bpftool's list of the perf-event
attachments each process holds (the kernel's own account, independent of
the tracer), and the server's own pid and accepted fd.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest

from .conftest import Proc, tracer_cmd

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(bool(os.environ.get("PYTRACER_BACKEND") or os.environ.get("PYTRACER_ATTACH")),
                       reason="the default plan of this host's kernel"),
]


def default_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTRACER_SYSCALL_HOOKS"}
    env.update(extra)
    return env


def tracepoints_of(pid: int) -> set[tuple[str, str]]:
    """(fd_type, tracepoint) of every perf-event attachment pid holds."""
    out = subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True, text=True, timeout=30, check=True)
    return {(e.get("fd_type", ""), e.get("tracepoint", "")) for e in json.loads(out.stdout or "[]")
            if e.get("pid") == pid}


def start_watch(*args: str, env: dict[str, str], pid: int | None = None) -> tuple[subprocess.Popen, Any]:
    scope = ["--pid", str(pid)] if pid else []
    p = subprocess.Popen([*tracer_cmd(), *args, "watch", "--json", "--interval", "0.5", "--top", "20",
                          "--duration", "40", *scope], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    assert p.stdout is not None
    return p, p.stdout


def first_report(stdout: Any) -> dict[str, Any]:
    line = stdout.readline()
    assert line, "tracer watch printed no report"
    return json.loads(line)


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "syscall-hooks"])
def test_no_syscall_tracepoint_unless_opted_in(opt_in: bool) -> None:
    p, out = start_watch(*(["--syscall-hooks"] if opt_in else []), env=default_env())
    try:
        first_report(out)
        attached = tracepoints_of(p.pid)
    finally:
        stop(p)
    syscalls = {tp for kind, tp in attached if kind == "tracepoint" and tp.startswith("sys_")}
    # The state hook is attached either way (the positive control).
    assert any(tp == "inet_sock_set_state" for _, tp in attached), attached
    if opt_in:
        assert {"sys_exit_accept4", "sys_enter_close"} <= syscalls, attached
    else:
        assert not syscalls, f"syscall tracepoints attached by default: {sorted(syscalls)}"


def test_doctor_says_whether_the_syscall_path_is_taxed() -> None:
    def doctor(*args: str) -> dict[str, Any]:
        r = subprocess.run([*tracer_cmd(), *args, "doctor", "--json"], capture_output=True, text=True, timeout=120,
                           env=default_env())
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    plain = doctor()
    assert plain["syscall_tax"]["programs"] == []
    assert all(h["kind"] != "syscall" for h in plain["hooks"].values())
    opted = doctor("--syscall-hooks")
    assert set(opted["syscall_tax"]["programs"]) >= {"accept4_sys_exit", "close_sys_enter"}


def test_accepted_socket_named_by_its_holder_without_accept_hook(procs: Any) -> None:
    """An accepted connection's row names the pid and fd that hold it, as the
    server itself reports them, with no accept(2) hook attached."""
    server = procs("server", "127.0.0.1", 0, 1)
    server.send()
    port = server.expect("listening")["port"]
    p, out = start_watch(env=default_env(), pid=server.pid)
    client: Proc | None = None
    try:
        first_report(out)
        assert not {tp for k, tp in tracepoints_of(p.pid) if tp.startswith("sys_")}
        client = procs("client", "127.0.0.1", port, 30)
        client.send()
        acc = server.expect("accepted")
        deadline = time.monotonic() + 20
        row = None
        while time.monotonic() < deadline:
            rep = json.loads(out.readline() or "{}")
            rows = [s for s in rep.get("sockets", []) if s["lport"] == port and s["direction"] == "passive"
                    and s["rport"] == acc["rport"]]
            if rows and rows[0]["pid"] is not None:
                row = rows[0]
                break
        assert row is not None, "the accepted socket never appeared with a holder"
        assert (row["pid"], row["fd"]) == (server.pid, acc["fd"])
        assert row["listener_pid"] == server.pid
    finally:
        stop(p)
        for proc in (client, server):
            if proc is not None:
                proc.kill()
