"""The nursery in front of the socket table (bpf/pytracer.bpf.c, "nursery"):
a socket that outlives its slot moves to "socks" whole, keeps being
followed there, and leaves nothing behind; checked against the socket's own
cookie (SO_COOKIE), ss, and the test's clock."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import numpy as np
import pytest

from pytracer import Tracer
from pytracer.kernel.abi import Stat
from pytracer.table import poll as poller
from pytracer.table import reads

from .leaky_support import loopback_pair, wait_until

pytestmark = pytest.mark.kernel

SO_COOKIE = 57
ESTABLISHED, FIN_WAIT2, CLOSE_WAIT, LISTEN = 1, 5, 8, 10


def cookie_of(s: socket.socket) -> int:
    return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def in_slot(t: Tracer, cookie: int) -> bool:
    raw = t.map("nursery").lookup(struct.pack("=I", cookie & (t.nursery_slots - 1)), reads.SLOT_DTYPE.itemsize)
    return raw is not None and int(np.frombuffer(raw, reads.SLOT_DTYPE)[0]["key"]) == cookie


def ss_state(port: int, cookie: int) -> str | None:
    out = subprocess.run(["ss", "-tanieH", f"( sport = :{port} or dport = :{port} )"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    for line in out.splitlines():
        if f"sk:{cookie:x}" in line:
            return line.split()[0]
    return None


def churn(lsn: socket.socket, n: int) -> None:
    """n connections to lsn, each closed by the server first (its end waits in
    TIME_WAIT, the client's port is free again at once)."""
    addr = lsn.getsockname()
    for _ in range(n):
        c = socket.create_connection(addr)
        a, _ = lsn.accept()
        a.close()
        c.close()


def test_a_socket_outliving_its_slot_moves_to_the_table_whole() -> None:
    with Tracer() as t:
        if not t.nursery_slots:
            pytest.skip("this attach mode keys records by pointer: no nursery")
        lsn, cli, acc, port = loopback_pair(256)
        held = {"client": cookie_of(cli), "server": cookie_of(acc)}
        t0 = time.monotonic_ns()
        try:
            first = {k: wait_until(lambda c=c: reads.lookup_record(t, c), 5, f"{k} record") for k, c in held.items()}
            assert all(in_slot(t, c) for c in held.values()), "a new socket's record starts in its slot"
            failed0 = poller.read_totals(t).stat(Stat.INSERT_FAILED)
            # Newer sockets until both held ones are moved out of their slots (cookies come
            # in per-CPU batches, so the slot's next owner may take more than one lap).
            made = 0
            while any(in_slot(t, c) for c in held.values()):
                assert made < 30 * t.nursery_slots, f"still in their slots after {made} connections"
                churn(lsn, 2000)
                made += 2000
            for k, c in held.items():
                rec = reads.lookup_record(t, c)
                assert rec is not None, f"the {k} record was lost when it left its slot"
                # Whole: the same life, as it was.
                for field in ("birth_ns", "state_ns", "transitions", "state", "direction", "owner_tgid", "lport",
                              "rport", "counted"):
                    assert rec[field] == first[k][field], (k, field, rec[field], first[k][field])
                assert int(rec["state"]) == ESTABLISHED and 0 < int(rec["birth_ns"]) <= t0
            # Followed where it is now: the peer's FIN, then the server's close.
            cli.close()
            rec = wait_until(lambda: (r := reads.lookup_record(t, held["server"])) is not None
                           and int(r["state"]) == CLOSE_WAIT and r, 5, "CLOSE_WAIT on the moved record")
            assert ss_state(port, held["server"]) == "CLOSE-WAIT"
            n = int(rec["transitions"])
            assert [int(x) for x in rec["history"][: n]][-2:] == [ESTABLISHED, CLOSE_WAIT]
            acc.close()
            wait_until(lambda: reads.lookup_record(t, held["server"]) is None, 10, "the server record's removal")
            wait_until(lambda: reads.lookup_record(t, held["client"]) is None, 10, "the client record's removal")
            # Nothing of the churn is left: the listener is this port's only record,
            # and no insert (or move out of a slot) failed.
            keys, socks = reads.read_socks(t)
            ours = (socks["lport"] == port) | (socks["rport"] == port)
            assert int(ours.sum()) == 1 and int(socks["state"][ours][0]) == LISTEN, socks[ours]
            assert len(set(keys.tolist())) == len(keys), "a record both in a slot and in the table"
            assert poller.read_totals(t).stat(Stat.INSERT_FAILED) == failed0
        finally:
            for s in (cli, acc, lsn):
                s.close()


@pytest.mark.parametrize("max_sockets", [4096, 262144], ids=["table alone", "with nursery"])
def test_records_are_keyed_by_the_sockets_own_cookie(max_sockets: int) -> None:
    """Whatever holds the records, each is found under the cookie the socket
    reports (SO_COOKIE), in the state ss shows, and goes with the socket."""
    with Tracer(max_sockets=max_sockets) as t:
        assert bool(t.nursery_slots) == (max_sockets >= 65536 and not t.key_by_ptr)
        if t.key_by_ptr:
            pytest.skip("this attach mode keys records by pointer")
        lsn, cli, acc, port = loopback_pair(8)
        try:
            for s in (lsn, cli, acc):
                c = cookie_of(s)
                rec = wait_until(lambda c=c: reads.lookup_record(t, c), 5, f"the record of cookie {c}")
                want = LISTEN if s is lsn else ESTABLISHED
                assert int(rec["state"]) == want and ss_state(port, c) == ("LISTEN" if s is lsn else "ESTAB")
            keys, _ = reads.read_socks(t)
            assert {cookie_of(s) for s in (lsn, cli, acc)} <= set(keys.tolist())
            gone = [cookie_of(s) for s in (cli, acc)]
            cli.close()
            acc.close()
            for c in gone:
                wait_until(lambda c=c: reads.lookup_record(t, c) is None, 10, f"cookie {c}'s record to go")
        finally:
            for s in (cli, acc, lsn):
                s.close()


def test_a_read_walks_the_table_again_only_once_it_changed() -> None:
    """Buffers that keep their walk of "socks" (watch's, export's) walk it
    again only after a write to it: a storm, whose records live and end in
    the nursery, leaves it unwalked; a record living there that changes
    state, or ends, makes the next read walk.  Every read holds this test's
    sockets in the states ss shows."""
    # Filtered to this process in the kernel: other tenants' sockets write nothing.
    with Tracer(pids=[os.getpid()]) as t:
        if not t.nursery_slots:
            pytest.skip("this attach mode keys records by pointer: no nursery")
        lsn, cli, acc, port = loopback_pair(256)
        held = {"client": cookie_of(cli), "server": cookie_of(acc)}
        buffers = reads.SockBuffers(keep_walk=True)

        def read() -> dict[int, int]:
            keys, recs = buffers.read(t, narrow=True)
            return dict(zip(keys.tolist(), recs["state"].tolist()))

        try:
            for k, c in held.items():
                wait_until(lambda c=c: reads.lookup_record(t, c), 5, f"the {k} record")
            made = 0
            while any(in_slot(t, c) for c in held.values()):  # into "socks", as in the test above
                assert made < 30 * t.nursery_slots, f"still in their slots after {made} connections"
                churn(lsn, 2000)
                made += 2000
            seen = read()
            assert buffers.walks == 1
            assert (seen[held["client"]], seen[held["server"]]) == (ESTABLISHED, ESTABLISHED)
            assert ss_state(port, held["client"]) == "ESTAB"
            churn(lsn, 300)
            for _ in range(3):
                seen = read()
            assert (buffers.walks, buffers.walks_skipped) == (1, 3), "a storm in the nursery made a read walk"
            assert (seen[held["client"]], seen[held["server"]]) == (ESTABLISHED, ESTABLISHED)
            assert seen[cookie_of(lsn)] == LISTEN
            cli.shutdown(socket.SHUT_WR)
            wait_until(lambda: ss_state(port, held["server"]) == "CLOSE-WAIT", 5, "the server end in CLOSE-WAIT")
            assert ss_state(port, held["client"]) == "FIN-WAIT-2"
            seen = read()
            assert buffers.walks == 2, "a record in the table changed state and the read did not walk"
            assert (seen[held["client"]], seen[held["server"]]) == (FIN_WAIT2, CLOSE_WAIT)
            assert read() == seen and buffers.walks == 2
            acc.close()
            wait_until(lambda: not set(held.values()) & set(read()), 5, "both records gone from a read")
            assert buffers.walks == 3 and ss_state(port, held["server"]) is None
            assert read()[cookie_of(lsn)] == LISTEN and buffers.walks == 3
        finally:
            for s in (cli, acc, lsn):
                s.close()
