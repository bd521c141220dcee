"""How the kernel holds the socket table ("socks"): preallocated wherever a
kprobe or classic tracepoint program uses it on a kernel before 6.1, which
cannot allocate hash elements safely in them (5.7 to 6.0 warn once and taint
the kernel); allocated as it fills everywhere else.

The witness is bpftool: the program types the tracer holds and the table's
flags and reserved memory, as the kernel reports them.  The VM matrix runs
the first test in every attach mode on 5.10, 6.1 and 6.12 (and
vagrant/guest/guest-test checks the guest's log for the warning)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import socket
import subprocess
import time

import pytest

from pytracer import Tracer
from pytracer.kernel import core
from pytracer.kernel.abi import PtSock
from pytracer.kernel.environment import kernel_version
from pytracer.table import reads

from .conftest import prog_ids_of, tracer_cmd

pytestmark = pytest.mark.kernel

BPF_F_NO_PREALLOC = 1  # include/uapi/linux/bpf.h
# kernel/bpf/verifier.c, is_tracing_prog_type(); bpftool's names for them.
TRACE_TYPES = {"kprobe", "tracepoint", "raw_tracepoint", "perf_event"}


def bpftool(*args: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout or "[]")


def socks_of(prog_ids: set[int]) -> tuple[set[str], dict]:
    """The types of the programs ``prog_ids`` and the "socks" map they use."""
    progs = [p for p in bpftool("prog", "show") if p["id"] in prog_ids]
    map_ids = {m for p in progs for m in p.get("map_ids", [])}
    socks = [m for m in bpftool("map", "show") if m["id"] in map_ids and m.get("name") == "socks"]
    assert len(socks) == 1, (progs, socks)
    return {p["type"] for p in progs}, socks[0]


def test_socket_table_allocation_suits_the_kernel() -> None:
    """`tracer watch` as a user starts it, in whatever attach mode and
    backend the environment forces."""
    p = subprocess.Popen([*tracer_cmd(), "watch", "--interval", "3600", "--no-leaks"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        deadline = time.monotonic() + 300  # bcc compiles first (minutes under TCG)
        while "attached" not in (line := p.stderr.readline()):
            assert line and time.monotonic() < deadline, f"tracer watch did not attach (exit {p.poll()})"
        types, socks = socks_of(prog_ids_of(p.pid))
    finally:
        p.terminate()
        p.wait(timeout=60)
    trace_type = types & TRACE_TYPES
    want_prealloc = bool(trace_type) and kernel_version() < (6, 1)
    assert (not socks["flags"] & BPF_F_NO_PREALLOC) == want_prealloc, (kernel_version(), types, socks)
    if want_prealloc:
        # Reserved up front: every element, whatever the table holds.
        assert socks["bytes_memlock"] >= socks["max_entries"] * (8 + ctypes.sizeof(PtSock)), socks


def test_preallocated_table_follows_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's preallocated table, on this kernel: the tracepoint mode
    planned as on a 5.10 kernel, then a real connection followed in it."""
    real = core.probe_features
    monkeypatch.setattr(core, "probe_features", lambda: dataclasses.replace(real(), version=(5, 10)))
    entries = 8192
    with Tracer(max_sockets=entries, attach="tracepoint") as t:
        assert t.table_prealloc is not None
        info = [m for m in bpftool("map", "show") if m["id"] == socks_id(t)][0]
        assert not info["flags"] & BPF_F_NO_PREALLOC, info
        assert info["bytes_memlock"] >= entries * (8 + ctypes.sizeof(PtSock)), info
        with socket.create_server(("127.0.0.1", 0)) as srv:
            port = srv.getsockname()[1]
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            try:
                _, socks = reads.read_socks(t)
                ours = socks[(socks["lport"] == port) | (socks["rport"] == port)]
                # The listener, the client and the accepted child.
                assert len(ours) == 3, ours
            finally:
                conn.close()
                cli.close()


def socks_id(t: Tracer) -> int:
    """The kernel's id of the tracer's "socks" map, from its fd."""
    with open(f"/proc/self/fdinfo/{t.map('socks').fd}") as f:
        for line in f:
            if line.startswith("map_id:"):
                return int(line.split()[1])
    raise AssertionError("no map_id in the map's fdinfo")
