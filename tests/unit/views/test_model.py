"""Record decoding and report building on recorded bytes (no kernel)."""

from __future__ import annotations

import ctypes
import socket

import numpy as np

from pytracer.kernel import abi
from pytracer.kernel.tcp_states import TcpState
from pytracer.table.poll import Snapshot, Totals
from pytracer.table.reads import SOCK_DTYPE
from pytracer.views import model


def record(**kw) -> bytes:
    r = abi.PtSock()
    r.owner_fd = -1
    for k, v in kw.items():
        if k in ("laddr", "raddr"):
            ctypes.memmove(getattr(r, k), v, len(v))
        elif k == "owner_comm":
            r.owner_comm = v
        elif k == "history":
            for i, s in enumerate(v):
                r.history[i] = s
        else:
            setattr(r, k, v)
    return bytes(r)


def table(*recs: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(recs), dtype=SOCK_DTYPE)


def empty_totals(ncpus: int = 2) -> Totals:
    stride = abi.percpu_stride(ctypes.sizeof(abi.PtAgg))
    return Totals.from_percpu(bytes(stride * ncpus), ncpus)


def test_decode_ipv4_and_ipv6_rows() -> None:
    v4 = record(birth_ns=1_000_000_000, state_ns=2_000_000_000, state=TcpState.CLOSE_WAIT, direction=1,
                family=2, lport=80, rport=5555, laddr=socket.inet_aton("10.0.0.1"),
                raddr=socket.inet_aton("10.0.0.2"), owner_tgid=42, owner_comm=b"nginx", owner_fd=7,
                transitions=3, history=[TcpState.SYN_RECV, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT], accepted=1)
    v6 = record(birth_ns=0, state_ns=3_000_000_000, state=TcpState.ESTABLISHED, direction=3, family=10,
                lport=443, rport=6000, laddr=socket.inet_pton(socket.AF_INET6, "fd00::1"),
                raddr=socket.inet_pton(socket.AF_INET6, "fd00::2"))
    t = table(v4, v6)
    row = model.socket_row(99, t[0], now_ns=5_000_000_000, start_mono_ns=500_000_000)
    assert row["laddr"] == "10.0.0.1" and row["raddr"] == "10.0.0.2"
    assert row["age_seconds"] == 4.0 and row["state_age_seconds"] == 3.0
    assert row["pid"] == 42 and row["comm"] == "nginx" and row["fd"] == 7
    assert row["state"] == "CLOSE_WAIT" and row["direction"] == "passive"
    assert row["history"] == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT"]
    row6 = model.socket_row(100, t[1], now_ns=5_000_000_000, start_mono_ns=500_000_000)
    assert row6["laddr"] == "fd00::1" and row6["family"] == "ipv6"
    # Unknown birth: at least the tracer's uptime, flagged as such.
    assert row6["age_seconds"] == 4.5 and row6["age_known"] is False
    assert row6["pid"] is None and row6["fd"] is None


def test_history_wraps_after_sixteen_transitions() -> None:
    hist = [(i % 2) + 1 for i in range(abi.PT_HISTORY)]
    r = table(record(transitions=20, history=hist))[0]
    h = model.state_history(r)
    assert len(h) == abi.PT_HISTORY
    # The 17th..20th transitions overwrote slots 0..3; the oldest shown is the 5th.
    assert h[0] == TcpState.name_of(hist[4])


def test_report_counts_states_and_filters_pids() -> None:
    recs = [
        record(state=TcpState.ESTABLISHED, direction=0, owner_tgid=1, birth_ns=10, state_ns=10),
        record(state=TcpState.CLOSE_WAIT, direction=1, owner_tgid=2, birth_ns=5, state_ns=20),
        record(state=TcpState.LISTEN, direction=2, owner_tgid=2, birth_ns=1, state_ns=1),
    ]
    snap = Snapshot(mono_ns=100, wall=0.0, totals=empty_totals(), keys=np.array([1, 2, 3], np.uint64),
                    socks=table(*recs), read_seconds=0.0)
    rep = model.build_report(snap, None, model.ReportOptions(top=5))
    assert rep["states"] == {"ESTABLISHED": 1, "CLOSE_WAIT": 1, "LISTEN": 1}
    assert rep["longest_lived"] == [2, 1]  # listeners are not connections
    assert rep["longest_in_state"] == [1, 2]
    rep2 = model.build_report(snap, None, model.ReportOptions(top=5, pids=(2,)))
    assert rep2["states"] == {"CLOSE_WAIT": 1, "LISTEN": 1}
    assert [s["cookie"] for s in rep2["sockets"]] == [2]
    # --top 0 lists none (README), however many sockets there are.
    rep0 = model.build_report(snap, None, model.ReportOptions(top=0))
    assert rep0["sockets"] == [] and rep0["longest_lived"] == [] and rep0["longest_in_state"] == []
    assert rep0["states"] == rep["states"] and rep0["tracked_sockets"] == 2


def test_percpu_totals_are_summed() -> None:
    stride = abi.percpu_stride(ctypes.sizeof(abi.PtAgg))
    cpus = []
    for cpu in range(3):
        a = abi.PtAgg()
        a.stats[abi.Stat.OPENED] = cpu + 1
        a.transitions[TcpState.CLOSE][TcpState.SYN_SENT] = 10 * (cpu + 1)
        a.hists[abi.PT_HIST_LIFETIME].slots[5] = 2
        a.hists[abi.PT_HIST_LIFETIME].sum_us = 100
        cpus.append(bytes(a).ljust(stride, b"\0"))
    t = Totals.from_percpu(b"".join(cpus), 3)
    assert t.stat(abi.Stat.OPENED) == 6
    assert t.transitions[TcpState.CLOSE, TcpState.SYN_SENT] == 60
    h = t.lifetime(abi.Direction.ACTIVE)
    assert h.count == 6 and h.sum_us == 300


def _random_table(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    socks = np.zeros(n, SOCK_DTYPE)
    socks["state"] = rng.integers(1, 12, n)
    socks["direction"] = rng.integers(0, 3, n)
    socks["owner_tgid"] = rng.integers(0, 4, n)
    socks["listener_tgid"] = rng.integers(0, 4, n)
    socks["birth_ns"] = np.where(rng.random(n) < 0.2, 0, rng.permutation(n) + 1_000)  # some unknown births
    socks["state_ns"] = rng.permutation(n) + 5_000  # distinct: one right order
    return socks


def test_view_reduced_a_chunk_at_a_time_is_the_view_of_the_whole_table() -> None:
    """The view watch's poller makes as it reads the table (ViewReducer)
    against table_view over the whole table at once, with and without
    --pid, in chunks that split the top-N candidates between them."""
    socks = _random_table(1000, 7)
    keys = np.arange(1, 1001, dtype=np.uint64)
    snap = Snapshot(mono_ns=10**9, wall=0.0, totals=empty_totals(), keys=keys, socks=socks, read_seconds=0.0)
    for pids in ((), (2,), (1, 3)):
        opts = model.ReportOptions(top=7, pids=pids, start_mono_ns=500)
        want = model.table_view(snap, opts)
        for chunk in (1, 3, 64, 1000):
            red = model.ViewReducer(opts)
            red.start()
            for first in range(0, len(socks), chunk):
                red.add(first, keys[first : first + chunk], socks[first : first + chunk])
            got = red.finish(123)
            assert got.table_mono_ns == 123
            assert got.counts.tolist() == want.counts.tolist() and got.tracked == want.tracked
            # Births tie at 0 (taken as the start): compare values, then the distinct state times exactly.
            births = model.effective_birth(socks, 500)
            assert births[got.longest_lived].tolist() == births[want.longest_lived].tolist()
            assert got.longest_in_state.tolist() == want.longest_in_state.tolist()


def test_report_of_a_narrow_table_takes_its_reduced_view() -> None:
    """build_report on a narrow table (no owner or birth columns) uses the
    view its reader reduced, and reads the shown rows again whole."""
    from pytracer.table import reads

    socks = _random_table(50, 3)
    keys = np.arange(1, 51, dtype=np.uint64)
    opts = model.ReportOptions(top=3, start_mono_ns=500)
    red = model.ViewReducer(opts)
    red.add(0, keys, socks)
    narrow = np.zeros(50, reads.NARROW_DTYPE)
    narrow[:] = socks[list(reads.NARROW_FIELDS)]

    class Src:
        nursery_slots = 0

        def map(self, name: str) -> Src:
            return self

        def lookup(self, key: bytes, size: int) -> bytes | None:
            i = int.from_bytes(key, "little") - 1
            return socks[i].tobytes() if 0 <= i < 50 else None

    snap = Snapshot(mono_ns=10**9, wall=0.0, totals=empty_totals(), keys=keys, socks=narrow, read_seconds=0.0,
                    table_mono_ns=10**9, src=Src(), reduced=red.finish(10**9))  # type: ignore[arg-type]
    whole = Snapshot(mono_ns=10**9, wall=0.0, totals=empty_totals(), keys=keys, socks=socks, read_seconds=0.0,
                     table_mono_ns=10**9)
    got, want = model.build_report(snap, None, opts), model.build_report(whole, None, opts)
    assert got["states"] == want["states"] and got["sockets"] == want["sockets"] and got["sockets"]
    assert got["longest_in_state"] == want["longest_in_state"]


def test_a_narrow_table_without_its_view_is_refused_with_a_reason() -> None:
    from pytracer.table import reads

    snap = Snapshot(mono_ns=1, wall=0.0, totals=empty_totals(), keys=np.arange(3, dtype=np.uint64),
                    socks=np.zeros(3, reads.NARROW_DTYPE), read_seconds=0.0)
    try:
        model.build_report(snap, None, model.ReportOptions())
    except ValueError as exc:
        assert "ViewReducer" in str(exc)
    else:
        raise AssertionError("a report of a narrow table without a view")
