"""The `tracer` command as users run it: JSON lines, --pid, errors, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any

import pytest

from .conftest import IN_VM, live_prog_ids, prog_ids_of, tracer_cmd

REQUIRED = {"ts", "states", "opened", "closed", "lifetime_histogram", "sockets"}
SOCKET_KEYS = {
    "cookie", "pid", "comm", "state", "age_seconds", "state_age_seconds", "family",
    "laddr", "lport", "raddr", "rport", "direction",
}


# How long the tracer may take to start: seconds here; under emulation the
# bcc backend compiles for minutes.
START_S = 600 if IN_VM else 60


def run_tracer(
    *args: str, timeout: float = 0, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess:
    return subprocess.run([*tracer_cmd(), *args], capture_output=True, text=True, timeout=timeout or START_S,
                          env={**os.environ, **(env or {})}, **kw)


def start_watch(*args: str, wait_attached: bool = True) -> subprocess.Popen:
    """`tracer watch --json`, returned once it says it is attached."""
    p = subprocess.Popen([*tracer_cmd(), "watch", "--json", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if wait_attached:
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(p.stderr.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(START_S)
        if not got or not got[0].startswith("tracer: attached"):
            p.kill()
            pytest.fail(f"tracer watch did not report attaching within {START_S}s: {got}")
    return p


def test_watch_json_lines_during_workload(procs: Any) -> None:
    server = procs("server", "127.0.0.1", 0, 2)
    watch = start_watch("--interval", "0.5", "--duration", "2.5", "--pid", str(server.pid), "--top", "50")
    server.send()
    port = server.expect("listening")["port"]
    # The client is not in --pid: only the server's end (via its listener) shows.
    client = procs("client", "127.0.0.1", port, "2.5,0.1")
    client.send()
    conn = client.expect("connected")
    # ss agrees on the connection's state while it is held.
    ss = subprocess.run(["ss", "-tanH", f"sport = :{conn['lport']} and dport = :{port}"], capture_output=True,
                        text=True).stdout
    assert ss.split()[0] == "ESTAB"
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert 3 <= len(lines) <= 6
    for rep in lines:
        assert REQUIRED <= rep.keys()
        for s in rep["sockets"]:
            assert SOCKET_KEYS <= s.keys()
        les = [b["le_seconds"] for b in rep["lifetime_histogram"]]
        assert les[-1] == "+Inf"
    last = lines[-1]
    assert last["states"] == {"ESTABLISHED": 1, "LISTEN": 1}
    assert sum(rep["opened"] for rep in lines) == 1
    mine = [s for s in last["sockets"] if conn["lport"] in (s["lport"], s["rport"])]
    assert {s["direction"]: s["pid"] for s in mine} == {"passive": server.pid}
    assert 1.0 < mine[0]["age_seconds"] < 2.5



def test_pid_filter_shows_only_those_processes(procs: Any) -> None:
    s1 = procs("server", "127.0.0.1", 0, 1)
    s2 = procs("server", "127.0.0.1", 0, 1)
    for s in (s1, s2):
        s.send()
    p1, p2 = s1.expect("listening")["port"], s2.expect("listening")["port"]
    # Held well past the watch: a report shows live sockets only (its shown
    # rows are read again at the report), and under emulation the last report
    # can come seconds after the clients connected.
    c1 = procs("client", "127.0.0.1", p1, "8.0")
    c2 = procs("client", "127.0.0.1", p2, "8.0")
    watch = start_watch("--interval", "0.5", "--duration", "1.6", "--pid", str(s1.pid), "--pid", str(c1.pid))
    c1.send()
    c2.send()
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    last = json.loads(out.splitlines()[-1])
    pids = {s["pid"] for s in last["sockets"]}
    assert pids == {s1.pid, c1.pid}
    ports = {s["lport"] for s in last["sockets"]} | {s["rport"] for s in last["sockets"]}
    assert p1 in ports and p2 not in ports
    assert sum(json.loads(x)["opened"] for x in out.splitlines()) == 2


def test_unknown_pid_is_one_line_and_nonzero() -> None:
    r = run_tracer("watch", "--pid", "999999999", "--duration", "1")
    assert r.returncode == 2
    assert "no process with pid 999999999" in r.stderr


def test_not_root_is_refused_cleanly() -> None:
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        "--bounding-set=-all", *tracer_cmd(), "watch", "--duration", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0] and "sudo" in lines[0]


def test_missing_libbpf_is_one_line() -> None:
    r = run_tracer("watch", "--duration", "1", env={"PYTRACER_LIBBPF": "/nonexistent/libbpf.so.1"})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "libbpf" in r.stderr and "PYTRACER_LIBBPF" in r.stderr


def test_forced_unavailable_mode_fails_cleanly() -> None:
    """kprobes don't exist on this kernel: a forced kprobe mode must say so."""
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
        pytest.skip("this kernel has kprobes")
    r = run_tracer("--attach", "kprobe", "watch", "--duration", "1")
    assert r.returncode == 1
    assert "kprobes unavailable" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly_and_detaches(sig: signal.Signals) -> None:
    watch = start_watch("--interval", "0.2")
    ids = prog_ids_of(watch.pid)
    assert ids, "tracer did not load its programs"
    assert ids <= live_prog_ids()
    watch.send_signal(sig)
    watch.communicate(timeout=90 if IN_VM else 20)
    assert watch.returncode == 0
    assert not (ids & live_prog_ids()), "programs left loaded after exit"


def test_doctor_reports_hooks() -> None:
    r = run_tracer("doctor", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["status"].startswith("ok")
    forced = os.environ.get("PYTRACER_ATTACH")
    bcc = os.environ.get("PYTRACER_BACKEND") == "bcc"
    assert info["btf"] is os.path.exists("/sys/kernel/btf/vmlinux")
    # Every kernel we test on has BTF and task_file iterators (5.8+).
    assert info["fd_scan"]["method"] == ("bpf" if info["btf"] else "proc"), info["fd_scan"]
    want = forced or ("tracepoint" if bcc else "tp_btf")
    assert info["hooks"]["state"]["kind"] == want, info["hooks"]
    accept = info["hooks"]["accept"]
    if forced:
        assert forced in accept["why"] and not accept["rejected"], accept
    elif accept["kind"] is None:
        # Every kind was passed over, each with its reason; the syscall
        # tracepoint only because syscall hooks are opt-in.
        better = {"kprobe", "syscall"} if bcc else {"fentry", "kprobe", "syscall"}
        assert {r["kind"] for r in accept["rejected"]} == better, accept
        assert all(r["why"] for r in accept["rejected"]), accept
        assert accept["why"].startswith("off: "), accept
        assert "--syscall-hooks" in [r for r in accept["rejected"] if r["kind"] == "syscall"][0]["why"]
    if not forced:
        # The default plan attaches no syscall tracepoint.
        assert info["syscall_tax"]["programs"] == [], info["syscall_tax"]
    if not os.path.exists("/sys/bus/event_source/devices/kprobe/type") and not forced:
        # No kprobe PMU here (the dev host): the plan names it.
        assert accept["kind"] is None, accept
        assert any("kprobes unavailable" in r["why"] for r in accept["rejected"]), accept
