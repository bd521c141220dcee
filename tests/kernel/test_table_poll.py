"""Reports on an older table (pytracer.table.poll.TablePoller): between table
reads, the state counts follow the kernel's counters.  Ground truth: the
connections this test opens and closes itself, on a port nobody else uses.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import pytest

from pytracer.kernel.core import Tracer
from pytracer.table import poll as poller
from pytracer.table import reads
from pytracer.views import model

pytestmark = pytest.mark.kernel


def _pairs(n: int) -> tuple[socket.socket, list[tuple[socket.socket, socket.socket]]]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(n)
    out = []
    for _ in range(n):
        c = socket.create_connection(lst.getsockname(), timeout=5)
        s, _ = lst.accept()
        out.append((c, s))
    return lst, out


def _established(report: dict[str, Any]) -> int:
    return int(report["states"].get("ESTABLISHED", 0))


def test_state_counts_between_table_reads() -> None:
    me = os.getpid()
    # Filtered to this process in the kernel: other tenants' sockets don't count.
    with Tracer(pids=[me]) as t:
        opts = model.ReportOptions(pids=(me,), top=5, start_mono_ns=time.monotonic_ns())
        # One table read, then never due; the view reduced as it is read, as watch's.
        tp = poller.TablePoller(t, duty=1e-9, max_age=3600, reducer=model.ViewReducer(opts))
        first = tp.poll()
        base = model.build_report(first, None, opts)
        assert base["tracer"]["table_age_seconds"] == 0.0
        lst, pairs = _pairs(20)
        try:
            time.sleep(0.2)
            snap = tp.poll()
            assert tp.reads == 1 and snap.table_mono_ns == first.table_mono_ns
            rep = model.build_report(snap, first, opts)
            assert rep["tracer"]["table_age_seconds"] > 0.1
            # Both ends of each connection: the table read before them has none.
            assert _established(base) == 0
            assert _established(rep) == 40, rep["states"]
            for c, s in pairs[:10]:
                c.close()
                s.close()
            time.sleep(0.2)
            rep2 = model.build_report(tp.poll(), snap, opts)
            assert _established(rep2) == 20, rep2["states"]
        finally:
            for c, s in pairs:
                c.close()
                s.close()
            lst.close()


def test_table_read_as_its_cost_allows() -> None:
    with Tracer() as t:
        tp = poller.TablePoller(t, duty=0.5)
        tp.poll()
        assert tp.reads == 1
        tp.charge(10.0)  # as if the read and its view took 10 s: next read due in 20 s
        tp.poll()
        assert tp.reads == 1
        tp.max_age = 0.0  # bound on staleness wins
        tp.poll()
        assert tp.reads == 2


def test_counts_read_a_chunk_at_a_time_match_the_connections() -> None:
    """count_socks (what an export scrape reads) against this test's own
    connections, in chunks smaller than the table so the walk takes many
    batches, with the nursery's young records included."""
    me = os.getpid()
    with Tracer(pids=[me]) as t:
        lst, pairs = _pairs(60)
        try:
            for c, _ in pairs[:25]:
                c.shutdown(socket.SHUT_WR)  # the server's end sees the FIN: CLOSE_WAIT
            time.sleep(0.3)
            states, records = reads.count_socks(t, chunk=7)
            est, cw = int(states[1]), int(states[8])
            # 35 pairs untouched (both ends), 25 servers in CLOSE_WAIT; the
            # 25 clients are in FIN_WAIT2 and the listener is a record too.
            assert (est, cw, int(states[5])) == (70, 25, 25), states.tolist()
            assert records >= 121 and int(states[10]) == 1
            # The same as the whole table read at once.
            _, socks = reads.read_socks(t)
            assert states.tolist() == reads.live_states(socks).tolist() and records == len(socks)
        finally:
            for c, s in pairs:
                c.close()
                s.close()
            lst.close()


def test_narrow_read_a_chunk_at_a_time_keeps_each_connection_and_reads_shown_ones_whole(monkeypatch) -> None:
    """The narrow table (what watch's poller and the leak scan keep) against
    this test's own connections: every socket in it once, with its state;
    its records read again whole by cookie (as a scan's candidates and a
    report's shown rows are) give each connection's ports and addresses and
    name this process; and the view reduced as the table was read counts
    them and lists them."""
    me = os.getpid()
    monkeypatch.setattr(reads, "READ_CHUNK", 7)  # many batches, chunks splitting the test's sockets
    with Tracer(pids=[me]) as t:
        lst, pairs = _pairs(40)
        try:
            for c, _ in pairs[:15]:
                c.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            opts = model.ReportOptions(pids=(me,), top=100, start_mono_ns=time.monotonic_ns())
            snap = poller.TablePoller(t, reducer=model.ViewReducer(opts)).poll()
            socks = snap.socks
            assert socks.dtype == reads.NARROW_DTYPE and len(snap.keys) == len(set(snap.keys.tolist()))
            port = lst.getsockname()[1]
            idx, whole = snap.records_at(np.arange(len(snap.keys)))
            assert whole.dtype == reads.PICK_DTYPE and (whole["state"] == socks["state"][idx]).all()
            mine = (whole["lport"] == port) | (whole["rport"] == port)
            got = sorted((int(s["lport"]), int(s["rport"]), int(s["state"])) for s in whole[mine])
            want = sorted([(port, 0, 10)]
                          + [(c.getsockname()[1], port, 5 if i < 15 else 1) for i, (c, _) in enumerate(pairs)]
                          + [(port, c.getsockname()[1], 8 if i < 15 else 1) for i, (c, _) in enumerate(pairs)])
            assert got == want
            peers = whole["raddr"][mine & (whole["rport"] != 0)]
            assert all(bytes(a[:4]) == socket.inet_aton("127.0.0.1") for a in peers)
            view = snap.reduced
            assert view.counts[1] == 50 and view.counts[5] == 15 and view.counts[8] == 15 and view.counts[10] == 1
            assert view.tracked == 80 and len(view.longest_lived) == 80
            assert set(snap.keys[view.longest_in_state].tolist()) == set(snap.keys[idx[mine & (whole["state"] != 10)]]
                                                                          .tolist())
            clients = idx[mine & (whole["state"] == 5)]
            i = int(clients[0])  # a client: connect() named its owner
            rec = snap.record(i)
            assert rec is not None and rec.dtype == reads.SOCK_DTYPE
            assert int(rec["owner_tgid"]) == me and int(rec["rport"]) == port and int(rec["state"]) == 5
            assert bytes(rec["owner_comm"]).split(b"\0")[0] and int(rec["state_ns"]) == int(socks["state_ns"][i])
        finally:
            for c, s in pairs:
                c.close()
                s.close()
            lst.close()
        # Gone sockets: their records are read as None, not as someone else's.
        time.sleep(0.3)
        assert snap.record(i) is None


def _bpf_map_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("anon_inode:bpf-map" in line for line in f)


def test_every_reader_shares_one_mapping_of_the_nursery() -> None:
    """Each mapping of the same pages counts in RSS on its own (2.4 MiB
    for the nursery): readers with buffers of their own (an export's
    scrapes and its scan thread) map it once between them."""
    me = os.getpid()
    with Tracer(pids=[me]) as t:
        assert t.nursery_slots, "the default table has a nursery"
        lst, pairs = _pairs(3)
        try:
            time.sleep(0.1)
            mapped = _bpf_map_mappings()  # libbpf's own (.rodata) included
            # Both alive at once, as a scrape's buffers and the scan thread's read.
            scrape, scan = reads.SockBuffers(keep_walk=True), reads.SockBuffers()
            keys, _ = reads.read_socks(t, scan)
            states, records = reads.count_socks(t, scrape)
            mine = {int(c) for sock in [lst] + [s for p in pairs for s in p]
                    for c in [int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, 57, 8), "little")]}
            assert mine <= set(keys.tolist())  # both reads found this test's sockets (in the nursery)
            assert records == len(keys) and states.sum() >= 7
            assert _bpf_map_mappings() - mapped == 1
        finally:
            for c, s in pairs:
                c.close()
                s.close()
            lst.close()
