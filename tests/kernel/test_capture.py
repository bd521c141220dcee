"""Kernel capture, end to end on the real kernel: lifetimes, transitions,
owners, the pid filter and counting under load.

Ground truth: the workload processes' own CLOCK_MONOTONIC readings, `ss`, and
an independent bpftrace script on the same tracepoint.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from pytracer.kernel.abi import Direction, Stat
from pytracer.kernel.core import Tracer
from pytracer.kernel.tcp_states import TcpState as S
from pytracer.table import poll as poller
from pytracer.views.model import socket_row

from .conftest import (
    CLOCK_TOLERANCE_S,
    IN_VM,
    KERNEL,
    check_lifetimes,
    kprobe_delta,
    kprobe_misses,
    lifetime_ranges,
    skip_allowance,
)


@pytest.fixture(autouse=True)
def _accept_and_close_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check the owner, fd and close the accept(2) and close(2)
    hooks put in each record.  Where fentry and kprobes are missing (this
    host) those hooks are syscall tracepoints, which are opt-in; the default
    plan is tests/kernel/test_syscall_free.py's."""
    monkeypatch.setenv("PYTRACER_SYSCALL_HOOKS", "1")

ENDS = (Direction.ACTIVE, Direction.PASSIVE)

# Within a few milliseconds (more in the test VMs): the kernel stamps the
# socket inside connect() and at its CLOSE; the workload stamps just before
# connect() and just after close().  Loopback and veth add microseconds.
TOLERANCE_S = CLOCK_TOLERANCE_S


def rows_of(tracer: Tracer, start_ns: int = 0) -> list[dict[str, Any]]:
    snap = poller.snapshot(tracer)
    return [socket_row(int(k), r, snap.mono_ns, start_ns) for k, r in zip(snap.keys, snap.socks)]


def lifetime_case(procs: Any, server_host: str, client_host: str | None, netns: tuple[str, str] | None,
                  holds: list[float]) -> None:
    srv_ns, cli_ns = netns if netns else (None, None)
    server = procs("server", server_host, 0, len(holds), netns=srv_ns)
    with Tracer(pids=[server.pid]) as tracer:
        before = poller.read_totals(tracer)
        server.send()
        port = server.expect("listening")["port"]
        client = procs("client", client_host or server_host, port, ",".join(map(str, holds)), netns=cli_ns)
        tracer.add_pids([client.pid])
        client.send()

        # While the first connection is held, its record's age matches the clock.
        conn = client.expect("connected")
        time.sleep(0.05)
        snap = poller.snapshot(tracer)
        rows = [r for r in (socket_row(int(k), r, snap.mono_ns, 0) for k, r in zip(snap.keys, snap.socks))
                if r["direction"] == "active" and r["lport"] == conn["lport"]]
        assert len(rows) == 1, rows
        # Born inside connect(), just after the client's clock reading.
        assert 0 <= (snap.mono_ns / 1e9 - conn["t"]) - rows[0]["age_seconds"] < TOLERANCE_S
        assert rows[0]["pid"] == client.pid

        conns = [client.expect("conn") for _ in holds]
        client.expect("done")
        server.wait(30)
        server.drain()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = poller.read_totals(tracer)
            if after.stat(Stat.CLOSED, Direction.PASSIVE) - before.stat(Stat.CLOSED, Direction.PASSIVE) >= len(holds):
                break
            time.sleep(0.05)

    # Ground truth from the processes' clocks: see conftest.lifetime_ranges.
    for d, ranges in lifetime_ranges(conns, server.events).items():
        assert len(ranges) == len(holds)
        problems = check_lifetimes(after.lifetime(d) - before.lifetime(d), ranges, TOLERANCE_S)
        assert not problems, (d, problems)
    opened = [after.stat(Stat.OPENED, d) - before.stat(Stat.OPENED, d) for d in (Direction.ACTIVE, Direction.PASSIVE)]
    assert opened == [len(holds), len(holds)]


# The first connection stays open while the table is read (longer under
# emulation, where a read can take a second).
FIRST = 2.0 if IN_VM else 0.2


def test_lifetimes_loopback_ipv4(procs: Any) -> None:
    lifetime_case(procs, "127.0.0.1", None, None, [FIRST, 0.45, 0.8])


def test_lifetimes_loopback_ipv6(procs: Any) -> None:
    lifetime_case(procs, "::1", None, None, [FIRST + 0.1, 0.6])


def test_lifetimes_across_netns_ipv4(procs: Any, netns_pair: Any) -> None:
    lifetime_case(procs, netns_pair.b4, None, (netns_pair.b, netns_pair.a), [FIRST + 0.05, 0.5])


def test_lifetimes_across_netns_ipv6(procs: Any, netns_pair: Any) -> None:
    lifetime_case(procs, netns_pair.b6, None, (netns_pair.b, netns_pair.a), [FIRST + 0.05, 0.5])


def ss_states(port: int, netns: str | None = None) -> dict[tuple[int, int], str]:
    """(local port, peer port) -> state, from ss."""
    cmd = ["ss", "-tanH", f"( sport = :{port} or dport = :{port} )"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    states = {}
    for line in out.splitlines():
        f = line.split()
        lport = int(f[3].rsplit(":", 1)[1])
        pport = int(f[4].rsplit(":", 1)[1]) if not f[4].endswith("*") else 0
        states[(lport, pport)] = S.from_ss(f[0]).name
    return states


def test_scripted_exchange_every_transition_in_order(procs: Any, oracle: Any) -> None:
    """Client and server ends of one connection, stepped; checked against ss,
    the per-socket history, the transition matrix, and bpftrace."""
    step = procs("stepper", "127.0.0.1", 0)
    with Tracer(pids=[step.pid]) as tracer:
        before = poller.read_totals(tracer)
        step.send()
        port = step.expect("listening")["port"]
        orc = oracle(port)
        step.send()
        est = step.expect("established")
        cport = est["client_lport"]

        def by_end() -> dict[str, dict[str, Any]]:
            out = {}
            for r in rows_of(tracer):
                if r["direction"] == "active" and r["lport"] == cport:
                    out["client"] = r
                elif r["direction"] == "passive" and r["rport"] == cport:
                    out["server"] = r
            return out

        ends = by_end()
        assert ends["client"]["state"] == "ESTABLISHED" and ends["server"]["state"] == "ESTABLISHED"
        assert ss_states(port)[(cport, port)] == "ESTABLISHED"
        assert ends["client"]["history"] == ["SYN_SENT", "ESTABLISHED"]
        assert ends["server"]["history"] == ["SYN_RECV", "ESTABLISHED"]
        assert ends["server"]["fd"] == est["server_fd"] and ends["server"]["pid"] == step.pid

        step.send()
        step.expect("half_closed")
        ends = by_end()
        ss = ss_states(port)
        assert ends["client"]["state"] == ss[(cport, port)] == "FIN_WAIT2"
        assert ends["server"]["state"] == ss[(port, cport)] == "CLOSE_WAIT"
        assert ends["client"]["history"] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
        assert ends["server"]["history"] == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT"]
        assert ends["server"]["peer_closed_first"] and not ends["server"]["app_closed"]
        assert ends["client"]["app_closed"]

        step.send()
        step.expect("closed")
        time.sleep(0.1)
        assert by_end() == {}, "both records end at CLOSE"
        after = poller.read_totals(tracer)
        step.send()
        step.expect("done")
    seen = orc.stop()

    delta = after.transitions.astype(np.int64) - before.transitions.astype(np.int64)
    got = {(S(o).name, S(n).name): int(delta[o, n]) for o, n in zip(*np.nonzero(delta))}
    expected = {
        ("CLOSE", "LISTEN"): 1,
        ("CLOSE", "SYN_SENT"): 1, ("SYN_SENT", "ESTABLISHED"): 1, ("ESTABLISHED", "FIN_WAIT1"): 1,
        ("FIN_WAIT1", "FIN_WAIT2"): 1, ("FIN_WAIT2", "CLOSE"): 1,
        ("LISTEN", "SYN_RECV"): 1, ("SYN_RECV", "ESTABLISHED"): 1, ("ESTABLISHED", "CLOSE_WAIT"): 1,
        ("CLOSE_WAIT", "LAST_ACK"): 1, ("LAST_ACK", "CLOSE"): 1,
    }
    assert got == expected
    # bpftrace saw the same connection transitions (it attached after listen(),
    # and still ran when the listener closed after our last read).
    oracle_pairs = Counter((S(o).name, S(n).name) for _, o, n, _, _ in seen)
    assert oracle_pairs.pop(("LISTEN", "CLOSE")) == 1
    assert oracle_pairs == Counter({k: v for k, v in expected.items() if k != ("CLOSE", "LISTEN")})


def test_owner_is_the_process_not_pytest(procs: Any) -> None:
    server = procs("server", "127.0.0.1", 0, 1)
    with Tracer(pids=[server.pid]) as tracer:
        server.send()
        port = server.expect("listening")["port"]
        client = procs("client", "127.0.0.1", port, "3.0" if IN_VM else "1.0")
        tracer.add_pids([client.pid])
        client.send()
        conn = client.expect("connected")
        acc = server.expect("accepted")
        time.sleep(0.1)
        server_link = os.readlink(f"/proc/{server.pid}/fd/{acc['fd']}")
        client_link = os.readlink(f"/proc/{client.pid}/fd/{conn['fd']}")
        rows = rows_of(tracer)
    by_dir = {r["direction"]: r for r in rows if conn["lport"] in (r["lport"], r["rport"])}

    assert by_dir["active"]["pid"] == client.pid != os.getpid()
    assert by_dir["passive"]["pid"] == server.pid != os.getpid()
    assert by_dir["passive"]["fd"] == acc["fd"]
    assert by_dir["passive"]["listener_pid"] == server.pid
    assert by_dir["active"]["comm"].startswith("python")
    # Inodes match what the processes' fd tables point at.
    assert server_link == f"socket:[{by_dir['passive']['inode']}]"
    assert client_link == f"socket:[{by_dir['active']['inode']}]"


@pytest.mark.slow
def test_burst_counts_exact_with_zero_loss(procs: Any, oracle: Any, bpf_stats: Any, record_property: Any) -> None:
    n = 1_000 if IN_VM else 10_000
    server = procs("burst-server", "127.0.0.1", 0, n)
    with Tracer(pids=[server.pid]) as tracer:
        before = poller.read_totals(tracer)
        server.send()
        port = server.expect("listening")["port"]
        orc = oracle(port, count_only=True)
        client = procs("burst-client", "127.0.0.1", port, n)
        tracer.add_pids([client.pid])
        client.send()
        done = client.expect("done", timeout=180)
        server.expect("done", timeout=60)
        # Both ends' last sockets close after the workload says done (the
        # client's in LAST_ACK until the server's final ACK).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = poller.read_totals(tracer)
            if all(after.stat(Stat.CLOSED, dr) - before.stat(Stat.CLOSED, dr) >= n for dr in ENDS):
                break
            time.sleep(0.1)
        infos = {p.name: p.info() for p in tracer.programs()}
        # Loaded for this burst: its kprobe misses (v6.7+) are the burst's.
        kprobe_missed = kprobe_delta({}, kprobe_misses(tracer), n)
        classic = tracer.choices["state"].kind in ("tracepoint", "kprobe")
        leftovers = [(r["state"], r["history"], r["age_seconds"], r["state_age_seconds"], r["lport"], r["rport"])
                     for r in rows_of(tracer) if r["direction"] != "listen"]
    seen = orc.stop()

    def d(s: Stat, off: int = 0) -> int:
        return after.stat(s, off) - before.stat(s, off)

    # A program that fires again on the same CPU while it runs (a softirq
    # interrupting it) is skipped and counted, in every mode: counted is not
    # silent, and such skips may explain a gap, but no more than they count.
    misses = {k: v.recursion_misses for k, v in infos.items()}
    kprobe = tracer.choices["state"].kind == "kprobe"
    if kprobe and KERNEL >= (6, 7):
        assert kprobe_missed is not None, f"no kprobe miss count on {os.uname().release}"
    slack = skip_allowance(classic, n, sum(misses.values()) + (kprobe_missed or 0),
                           kprobe=kprobe and kprobe_missed is None)
    assert d(Stat.INSERT_FAILED) == 0
    got = {f"{what.name}_{dr.name}": d(what, dr) for what in (Stat.OPENED, Stat.CLOSED) for dr in ENDS}
    assert all(n - slack <= v <= n for v in got.values()), (got, slack, misses, leftovers)
    # Opens happen in process context or at the handshake: never lost here.
    assert got["OPENED_ACTIVE"] == n or classic, got
    if got != dict.fromkeys(got, n):
        print(f"{tracer.choices['state'].kind} mode: counts {got}, allowed {slack} short "
              f"({misses}); records left: {leftovers}")
    # The oracle (a classic tracepoint program too) counts the same births.
    births = Counter((o, nw) for _, o, nw, _, _ in seen)
    oracle_slack = skip_allowance(True, n)
    assert n - oracle_slack <= births[(S.CLOSE, S.SYN_SENT)] <= n
    assert n - oracle_slack <= births[(S.LISTEN, S.SYN_RECV)] <= n
    assert done["count"] == n
    # Per-event cost of the programs during the burst (reported, not judged:
    # the machine is shared).  run_time_ns excludes the attach trampoline.
    for name, info in infos.items():
        if info.run_cnt:
            cost = info.run_time_ns / info.run_cnt
            record_property(f"{name}_ns_per_run", round(cost, 1))
            print(f"{name}: {info.run_cnt} runs, {cost:.0f} ns/run")
