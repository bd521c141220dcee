"""The bcc backend against the CO-RE backend and the workload's own clocks.

Both backends run at the same time, filtered on the same processes, in the
same attach mode (tracepoint, then kprobe), so they see the very same kernel
events: their answers must agree exactly (per-socket records, transition
matrices, counters) except for timestamps, which differ by the few
microseconds between the two programs running.  Each is also checked against
ground truth: the processes' CLOCK_MONOTONIC readings and pids.

Runs only where bcc can compile (python3-bpfcc and this kernel's headers):
the VM tier (`vagrant/host/run-vm 6.1 -- python3 -m pytest tests/kernel/test_bcc_backend.py`).
Where the kernel has no BTF, only the bcc side runs, against ground truth.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

import numpy as np
import pytest

from pytracer.kernel.abi import Direction, Stat
from pytracer.kernel.bcc import BccTracer, find_headers, import_bcc
from pytracer.kernel.core import Tracer
from pytracer.kernel.environment import EnvironmentProblem, kernel_release, probe_features
from pytracer.kernel.tcp_states import TcpState as S
from pytracer.table import poll as poller
from pytracer.table import reads
from pytracer.views.model import socket_row


def _skip_reason() -> str | None:
    try:
        import_bcc()
        find_headers(kernel_release())
    except EnvironmentProblem as exc:
        return f"bcc backend unavailable here: {exc}"
    if os.geteuid() != 0:
        return "needs root"
    return None


_why = _skip_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

HAVE_BTF = os.path.exists("/sys/kernel/btf/vmlinux")
# Same bounds as test_capture: the kernel stamps inside connect() and at
# CLOSE, the workload just before connect() and just after close().
TOLERANCE_S = 0.005
# Between the two backends, which stamp the same events one program apart;
# a TCG vCPU on a loaded host can stall for milliseconds in between.
BETWEEN_S = 0.020

MODES = ("tracepoint", "kprobe")

EXACT_FIELDS = (
    "state", "direction", "flags", "counted", "accepted", "app_closed", "family", "lport", "rport",
    "laddr", "raddr", "owner_tgid", "closer_tgid", "owner_fd", "listener_tgid", "ino", "netns_ino",
    "cgroup_id", "owner_comm", "transitions", "history",
)
TIME_FIELDS = ("birth_ns", "state_ns", "close_ns")


def _mode_usable(mode: str) -> str | None:
    f = probe_features()
    if mode == "kprobe" and not f.kprobes:
        return "kprobes unavailable on this kernel"
    return None


@pytest.fixture(scope="module", params=MODES)
def pair(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """{"bcc": BccTracer, "core": Tracer (when BTF exists)}, both attached in
    one attach mode.  A bcc compile takes minutes under TCG, so each mode
    compiles once for the module: the pid filter starts with pytest's own
    pid (which makes no sockets) and each test widens it to its processes."""
    mode = request.param
    why = _mode_usable(mode)
    if why:
        pytest.skip(why)
    pids = [os.getpid()]
    with contextlib.ExitStack() as stack:
        out: dict[str, Any] = {}
        if HAVE_BTF:
            out["core"] = stack.enter_context(Tracer(pids=pids, attach=mode))
        out["bcc"] = stack.enter_context(BccTracer(pids=pids, attach=mode))
        for name, t in out.items():
            got = {h: c.kind for h, c in t.choices.items() if c.kind and h != "reset"}
            assert got["state"] == mode, (name, got)
        yield out


@contextlib.contextmanager
def side_by_side(tracers: dict[str, Any], pids: list[int]) -> Iterator[dict[str, Any]]:
    add_pids(tracers, pids)
    yield tracers


def add_pids(tracers: dict[str, Any], pids: list[int]) -> None:
    for t in tracers.values():
        t.add_pids(pids)


def records(t: Any, port: int) -> dict[int, np.void]:
    """This test's socket records (either end of `port`), by key."""
    keys, socks = reads.read_socks(t)
    return {int(k): r for k, r in zip(keys, socks) if port in (int(r["lport"]), int(r["rport"]))}


def assert_same_records(core: dict[int, np.void], bcc: dict[int, np.void]) -> None:
    """Both backends key by sk pointer in these modes and run the same
    lifecycle (bpf/lifecycle.bpf.h): same keys, same records."""
    def show(recs: dict[int, np.void]) -> list[tuple[Any, ...]]:
        rows = [socket_row(k, r, time.monotonic_ns(), 0) for k, r in recs.items()]
        return [(hex(r["cookie"]), r["direction"], r["lport"], r["rport"], r["pid"], r["history"]) for r in rows]

    assert sorted(core) == sorted(bcc), {"core": show(core), "bcc": show(bcc)}
    for k in core:
        a, b = core[k], bcc[k]
        for f in EXACT_FIELDS:
            assert np.array_equal(a[f], b[f]), (hex(k), f, a[f], b[f])
        for f in TIME_FIELDS:
            if int(a[f]) == 0 or int(b[f]) == 0:
                assert int(a[f]) == int(b[f]) == 0, (hex(k), f, int(a[f]), int(b[f]))
            else:
                assert abs(int(a[f]) - int(b[f])) < BETWEEN_S * 1e9, (hex(k), f, int(a[f]), int(b[f]))


def delta(after: poller.Totals, before: poller.Totals) -> poller.Totals:
    return poller.Totals(
        stats=after.stats.astype(np.int64) - before.stats.astype(np.int64),
        transitions=after.transitions.astype(np.int64) - before.transitions.astype(np.int64),
        hists=after.hists.astype(np.int64) - before.hists.astype(np.int64),
    )


def test_lifetimes_and_owners_match_core(procs: Any, pair: dict[str, Any]) -> None:
    holds = [1.5, 0.5]  # the first is held while the tables are read (slow under TCG)
    server = procs("server", "127.0.0.1", 0, len(holds))
    with side_by_side(pair, [server.pid]) as tracers:
        before = {n: poller.read_totals(t) for n, t in tracers.items()}
        server.send()
        port = server.expect("listening")["port"]
        client = procs("client", "127.0.0.1", port, ",".join(map(str, holds)))
        add_pids(tracers, [client.pid])
        client.send()

        # While the first connection is held: owners, fds, inodes, ages.
        conn = client.expect("connected")
        acc = server.expect("accepted")
        links = {
            "active": os.readlink(f"/proc/{client.pid}/fd/{conn['fd']}"),
            "passive": os.readlink(f"/proc/{server.pid}/fd/{acc['fd']}"),
        }
        time.sleep(0.1)
        now_ns = time.monotonic_ns()
        recs = {n: records(t, port) for n, t in tracers.items()}
        rows = [socket_row(k, r, now_ns, 0) for k, r in recs["bcc"].items()]
        by_dir = {r["direction"]: r for r in rows if conn["lport"] in (r["lport"], r["rport"])}
        assert by_dir["active"]["pid"] == client.pid != os.getpid()
        assert by_dir["passive"]["pid"] == server.pid != os.getpid()
        assert by_dir["passive"]["listener_pid"] == server.pid
        assert by_dir["passive"]["rport"] == conn["lport"] and by_dir["passive"]["raddr"] == "127.0.0.1"
        listeners = [r for r in rows if r["direction"] == "listen" and r["lport"] == port]
        # The kprobe mode sees listen() at inet_csk_listen_start() (f32eec2).
        assert [r["pid"] for r in listeners] == [server.pid]
        assert by_dir["active"]["comm"].startswith("python")
        # Born inside connect(), so after the client's stamp taken just before
        # it; how much after is how long connect() took (ms under TCG).
        since_stamp = now_ns / 1e9 - conn["t"]
        assert -0.002 < since_stamp - by_dir["active"]["age_seconds"] < 0.050, (since_stamp, by_dir["active"])
        assert links["active"] == f"socket:[{by_dir['active']['inode']}]"
        # accept(2)'s exit knows the fd and the file (the kprobe mode takes it
        # too, for the fd: inet_csk_accept() returns before there is one).
        assert by_dir["passive"]["fd"] == acc["fd"]
        assert links["passive"] == f"socket:[{by_dir['passive']['inode']}]"
        if "core" in recs:
            assert_same_records(recs["core"], recs["bcc"])

        conns = [client.expect("conn") for _ in holds]
        client.expect("done")
        server.wait(30)
        server.drain()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = {n: poller.read_totals(t) for n, t in tracers.items()}
            if all(
                after[n].stat(Stat.CLOSED, Direction.PASSIVE) - before[n].stat(Stat.CLOSED, Direction.PASSIVE)
                >= len(holds)
                for n in tracers
            ):
                break
            time.sleep(0.05)
        left = {n: records(t, port) for n, t in tracers.items()}

    accepted = {e["rport"]: e["t"] for e in server.events if e.get("event") == "accepted"}
    closed = {e["rport"]: e["t"] for e in server.events if e.get("event") == "closed"}
    # Each lifetime is bracketed by the processes' clocks.  The client closes
    # first; its full socket is destroyed (entering TIME_WAIT) when the
    # server's FIN arrives, and the server's child when the client's last
    # ACK does; on loopback both happen inside the server's close().  So
    # both ends die after the client's close and before the server stamps
    # its own close (under TCG the server takes tens of ms to notice EOF).
    # The active end is born inside connect(), the passive one during it.
    by_port = {c["lport"]: c for c in conns}
    bounds = {
        Direction.ACTIVE: (
            sum(c["t_close"] - c["t_connect"] for c in conns),
            sum(closed[p] - by_port[p]["t_connect"] for p in by_port),
        ),
        Direction.PASSIVE: (
            sum(by_port[p]["t_close"] - accepted[p] for p in by_port),
            sum(closed[p] - by_port[p]["t_connect"] for p in by_port),
        ),
    }
    d = {n: delta(after[n], before[n]) for n in after}
    for n, dn in d.items():
        for direction, (lo, hi) in bounds.items():
            h = dn.lifetime(direction)
            assert h.count == len(holds), (n, direction, h.count)
            # The kernel's sum is exact in microseconds: against the clocks.
            tol = TOLERANCE_S * len(holds)
            assert lo - tol < h.sum_us / 1e6 < hi + tol, (n, direction, h.sum_us, lo, hi)
        assert [dn.stat(Stat.OPENED, x) for x in (Direction.ACTIVE, Direction.PASSIVE)] == [len(holds)] * 2, n
        assert dn.stat(Stat.INSERT_FAILED) == 0, n
    # Whatever the clocks, the two backends saw the same lives.
    assert {k: v for k, v in left["bcc"].items() if v["direction"] != Direction.LISTEN} == {}
    if "core" in d:
        core, bcc = d["core"], d["bcc"]
        assert np.array_equal(core.transitions, bcc.transitions)
        assert np.array_equal(core.stats, bcc.stats), {
            Stat(i).name if i in Stat._value2member_map_ else i: (int(a), int(b))
            for i, (a, b) in enumerate(zip(core.stats, bcc.stats)) if a != b
        }
        for direction in (Direction.ACTIVE, Direction.PASSIVE):
            hc, hb = core.lifetime(direction), bcc.lifetime(direction)
            assert abs(hc.sum_us - hb.sum_us) < BETWEEN_S * 1e6 * len(holds), (direction, hc.sum_us, hb.sum_us)


def test_transitions_and_histories_match_core(procs: Any, pair: dict[str, Any]) -> None:
    step = procs("stepper", "127.0.0.1", 0)
    with side_by_side(pair, [step.pid]) as tracers:
        before = {n: poller.read_totals(t) for n, t in tracers.items()}
        step.send()
        port = step.expect("listening")["port"]
        step.send()
        est = step.expect("established")
        cport = est["client_lport"]

        def ends(t: Any) -> dict[str, dict[str, Any]]:
            out = {}
            now = time.monotonic_ns()
            for k, r in records(t, port).items():
                row = socket_row(k, r, now, 0)
                if row["direction"] == "active" and row["lport"] == cport:
                    out["client"] = row
                elif row["direction"] == "passive" and row["rport"] == cport:
                    out["server"] = row
            return out

        # tcp_set_state() never sees the child's LISTEN -> SYN_RECV (it goes
        # through inet_sk_set_state()): with a kprobe, the child's first
        # SYN_RECV -> ESTABLISHED records that birth too, as in every mode.
        server_birth = ["SYN_RECV", "ESTABLISHED"]
        e = ends(tracers["bcc"])
        assert e["client"]["history"] == ["SYN_SENT", "ESTABLISHED"]
        assert e["server"]["history"] == server_birth
        assert e["client"]["pid"] == e["server"]["pid"] == step.pid
        if "core" in tracers:
            assert_same_records(records(tracers["core"], port), records(tracers["bcc"], port))

        step.send()
        step.expect("half_closed")
        e = ends(tracers["bcc"])
        assert e["client"]["history"] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
        assert e["server"]["history"] == [*server_birth, "CLOSE_WAIT"]
        assert e["server"]["peer_closed_first"] and not e["server"]["app_closed"]
        assert e["client"]["app_closed"]
        if "core" in tracers:
            assert_same_records(records(tracers["core"], port), records(tracers["bcc"], port))

        step.send()
        step.expect("closed")
        time.sleep(0.1)
        for n, t in tracers.items():
            assert ends(t) == {}, (n, "both records end at CLOSE")
        after = {n: poller.read_totals(t) for n, t in tracers.items()}
        step.send()
        step.expect("done")

    expected = {
        ("CLOSE", "LISTEN"): 1, ("LISTEN", "SYN_RECV"): 1,
        ("CLOSE", "SYN_SENT"): 1, ("SYN_SENT", "ESTABLISHED"): 1, ("ESTABLISHED", "FIN_WAIT1"): 1,
        ("FIN_WAIT1", "FIN_WAIT2"): 1, ("FIN_WAIT2", "CLOSE"): 1,
        ("SYN_RECV", "ESTABLISHED"): 1, ("ESTABLISHED", "CLOSE_WAIT"): 1,
        ("CLOSE_WAIT", "LAST_ACK"): 1, ("LAST_ACK", "CLOSE"): 1,
    }
    for n in after:
        dn = delta(after[n], before[n])
        got = {(S(o).name, S(w).name): int(dn.transitions[o, w]) for o, w in zip(*np.nonzero(dn.transitions))}
        assert got == expected, n
        assert dn.stat(Stat.APP_CLOSE) == 2, n
    if "core" in after:
        assert np.array_equal(delta(after["core"], before["core"]).stats, delta(after["bcc"], before["bcc"]).stats)
