"""Least privilege for every command: `watch`, `leaks` and `doctor` run as
uid 0 with only the capabilities docs/privileges.md says the deploy files
grant (`export` has its own run in test_exporter.py), against a leak of a
uid-65534 process and a network namespace of the test's own.  Then one
capability at a time is dropped (or added), and each row of the table is
checked: the exit status, who owns the leaked sockets, which namespaces
are inventoried, and the one line naming the capability.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from tests.privileges import granted

from .conftest import Proc, tracer_cmd
from .exporter_helpers import start_workload

pytestmark = pytest.mark.kernel

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NS = f"ptpriv{os.getpid()}"
LEAKS = ["leaks", "--json", "--close-wait-after", "1"]
WATCH = ["watch", "--json", "--duration", "5", "--interval", "1", "--close-wait-after", "1"]


def capabilities_run(args: list[str], caps: set[str], env: dict | None = None) -> subprocess.CompletedProcess:
    bounding = "-all" + "".join(f",+{c.removeprefix('CAP_').lower()}" for c in sorted(caps))
    return subprocess.run(["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", *tracer_cmd(), *args],
                          capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def leak() -> Iterator[tuple[int, int]]:
    """(pid, listening port) of a uid-65534 process holding 3 CLOSE_WAIT sockets; and a netns with a listener."""
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=30)
    inside = Proc(["python3", "-c", "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
                   "print('{\"event\": \"ready\"}', flush=True); time.sleep(600)"], netns=NS, name="nslistener")
    leaky = start_workload("leaky", "127.0.0.1", 3, 0.05, prefix=NOBODY)
    try:
        inside.expect("ready")
        leaky.send()
        port = leaky.expect("listening")["port"]
        leaky.expect("done", timeout=60)
        time.sleep(2)  # older than --close-wait-after
        yield leaky.pid, port
    finally:
        leaky.kill()
        inside.kill()
        subprocess.run(["ip", "netns", "del", NS], timeout=30)


def report(r: subprocess.CompletedProcess) -> dict[str, Any]:
    """leaks' report; for watch, its last line with the flags of every line (the leak
    scan runs as its cost allows, so not every interval carries one: the /proc walk
    on a busy host costs the most)."""
    assert r.stdout.strip(), r.stderr
    lines = [json.loads(ln) for ln in r.stdout.strip().splitlines()]
    rep = dict(lines[-1])
    rep["flags"] = list({f["cookie"]: f for ln in lines for f in ln.get("flags", [])}.values())
    return rep


def owned(rep: dict, leak: tuple[int, int]) -> tuple[int, int]:
    """(CLOSE_WAIT flags on the leak's port, those attributed to its pid)."""
    pid, port = leak
    cw = [f for f in rep["flags"] if f["kind"] == "close_wait" and f["lport"] == port]
    return len(cw), sum(1 for f in cw if f.get("pid") == pid)


def lines_naming(stderr: str, cap: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if cap in ln]


def our_netns(rep: dict) -> dict:
    return next(n for n in rep["netns"] if n["label"] == f"netns {NS}")


@pytest.mark.parametrize("args", [LEAKS, WATCH], ids=["leaks", "watch"])
def test_runs_with_only_the_documented_capabilities(leak: tuple[int, int], args: list[str]) -> None:
    r = capabilities_run(args, granted())
    assert r.returncode in (0, 1), r.stderr  # leaks: 1 means "something is flagged"
    rep = report(r)
    assert owned(rep, leak) == (3, 3), ([(f["kind"], f.get("lport"), f.get("pid")) for f in rep["flags"]], leak)
    if args is LEAKS:
        assert "setns" in (our_netns(rep)["error"] or "") and "CAP_SYS_ADMIN" in our_netns(rep)["error"]
    # What is missing (other namespaces) is said once, on one line, however many scans watch ran.
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("no CAP_SYS_ADMIN")]) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_doctor_with_only_the_documented_capabilities() -> None:
    r = capabilities_run(["doctor", "--json"], granted())
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["status"].startswith("ok"), info["status"]
    held = {cap for cap, yes in info["capabilities"].items() if yes}
    assert held == granted() & set(info["capabilities"])
    assert [ln.split(":")[0] for ln in info["missing_capabilities"]] == ["no CAP_SYS_ADMIN"]
    text = capabilities_run(["doctor"], granted())
    assert len(lines_naming(text.stdout, "no CAP_SYS_ADMIN")) == 1


@pytest.mark.parametrize("cap", ["CAP_BPF", "CAP_PERFMON"])
@pytest.mark.parametrize("args", [LEAKS, WATCH, ["doctor"]], ids=["leaks", "watch", "doctor"])
def test_without_a_tracing_capability_one_line_names_it(cap: str, args: list[str]) -> None:
    r = capabilities_run(args, granted() - {cap})
    if args == ["doctor"]:  # doctor reports everything it can, then fails on the status line
        assert r.returncode == 1 and len(lines_naming(r.stdout, f"no {cap}: cannot")) == 1, r.stdout
        assert f"status        failed: pytracer needs root: missing {cap}" in r.stdout
        return
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"Error: pytracer needs root: missing {cap} (or CAP_SYS_ADMIN) to load its tracing programs; "
        "run it with sudo (docs/privileges.md)"]


@pytest.mark.parametrize("cap", ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"])
@pytest.mark.parametrize("args", [LEAKS, WATCH], ids=["leaks", "watch"])
def test_proc_walk_without_cap_shows_no_owner_and_says_so_once(leak: tuple[int, int], cap: str,
                                                               args: list[str]) -> None:
    r = capabilities_run(args, granted() - {cap}, env={"PYTRACER_FDSCAN": "proc"})
    assert r.returncode in (0, 1), r.stderr
    assert owned(report(r), leak) == (3, 0)  # still found, without an owner
    said = lines_naming(r.stderr, f"no {cap}")
    assert len(said) == 1 and "show no owner" in said[0], r.stderr
    # ...while with every documented capability the same walk finds the owner.
    full = capabilities_run(args, granted(), env={"PYTRACER_FDSCAN": "proc"})
    assert owned(report(full), leak) == (3, 3)


def test_iterators_need_neither_ptrace_nor_dac_read_search(leak: tuple[int, int]) -> None:
    r = capabilities_run(LEAKS, granted() - {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"})
    assert owned(report(r), leak) == (3, 3)
    assert not lines_naming(r.stderr, "CAP_SYS_PTRACE"), r.stderr


@pytest.mark.parametrize("extra,enters", [("CAP_SYS_ADMIN", True), ("CAP_NET_ADMIN", False)])
def test_other_namespaces_need_sys_admin_not_net_admin(leak: tuple[int, int], extra: str, enters: bool) -> None:
    r = capabilities_run(LEAKS, granted() | {extra})
    ns = our_netns(report(r))
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("no CAP_SYS_ADMIN")]
    if enters:
        assert ns["error"] is None and ns["port_range"] and not said, (ns, r.stderr)
    else:
        assert "CAP_SYS_ADMIN" in (ns["error"] or "") and len(said) == 1, (ns, r.stderr)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
