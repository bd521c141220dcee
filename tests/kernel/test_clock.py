"""When a transition happened, against the test's own clock.

A record's ``state_ns`` is the time its socket entered its state; every
time-in-state figure (the CLOSE_WAIT and FIN_WAIT2 flags' ages, the
``state_duration`` histograms) is a difference of two of them.  On the
transitions the kernel makes only while handling a received segment, the
programs with BTF read the stamp the kernel put on the socket as it began
handling that segment, instead of calling bpf_ktime_get_ns() (see
transition_ns() in bpf/pytracer.bpf.c).  That is exact only if the kernel
really did stamp it then: a stale stamp would read as the socket's previous
activity.  So each socket here sits still for a second first, and each
transition's time must fall inside the window the test brackets it with.
Records are found by their ports, so every attach mode runs this (those
without BTF read the clock on every transition).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

from pytracer import Tracer
from pytracer.kernel import abi
from pytracer.table import poll as poller
from pytracer.table import reads

from .leaky_support import wait_until

pytestmark = pytest.mark.kernel

ESTABLISHED, FIN_WAIT2, CLOSE_WAIT = 1, 5, 8
PASSIVE = abi.Direction.PASSIVE
QUIET_S = 1.0
# A stamp kept in microseconds (tcp_mstamp, before v4.20) may fall up to 1 us
# before the nanosecond it stands for.
US = 1000


def record_in(t: Tracer, lport: int, rport: int, state: int) -> Any:
    """The record of the socket lport -> rport, once it is in ``state``."""
    def find() -> Any:
        _, socks = reads.read_socks(t)
        hit = socks[(socks["lport"] == lport) & (socks["rport"] == rport) & (socks["state"] == state)]
        return hit[int(hit["state_ns"].argmax())] if len(hit) else None
    return wait_until(find, 10, f"the record of {lport} -> {rport} in state {state}")


def within(name: str, ns: int, lo: int, hi: int) -> None:
    assert lo - US <= ns <= hi, (f"{name} was stamped {(ns - lo) / 1e6:+.3f} ms from the start of the "
                                 f"{(hi - lo) / 1e6:.3f} ms window the test saw it happen in")


def test_transition_times_are_when_they_happen_not_the_sockets_last_activity() -> None:
    # Only this process's sockets are counted, so the passive lifetime
    # histogram below holds this test's connection alone.
    with Tracer(pids=[os.getpid()]) as t:
        lsn = socket.socket()
        cli = socket.socket()
        acc = None
        try:
            lsn.bind(("127.0.0.1", 0))
            lsn.listen(8)
            sport = lsn.getsockname()[1]
            time.sleep(QUIET_S)  # the listener's stamp, which a child starts from, is a second old

            # SYN_SENT -> ESTABLISHED (client), SYN_RECV -> ESTABLISHED (the accepted child).
            t0 = time.monotonic_ns()
            cli.connect(lsn.getsockname())
            t1 = time.monotonic_ns()
            acc, _ = lsn.accept()
            t2 = time.monotonic_ns()
            cport = cli.getsockname()[1]
            within("the client's ESTABLISHED", int(record_in(t, cport, sport, ESTABLISHED)["state_ns"]), t0, t1)
            child = record_in(t, sport, cport, ESTABLISHED)
            within("the child's ESTABLISHED", int(child["state_ns"]), t0, t2)
            born = int(child["birth_ns"])

            # ESTABLISHED -> CLOSE_WAIT (server) and FIN_WAIT1 -> FIN_WAIT2 (client), after a
            # quiet second on both: the client's FIN, and the ACK of it.
            cli.sendall(b"x")
            assert acc.recv(1) == b"x"
            time.sleep(QUIET_S)
            t3 = time.monotonic_ns()
            cli.shutdown(socket.SHUT_WR)
            fin_wait2 = int(record_in(t, cport, sport, FIN_WAIT2)["state_ns"])
            close_wait = int(record_in(t, sport, cport, CLOSE_WAIT)["state_ns"])
            t4 = time.monotonic_ns()
            within("the client's FIN_WAIT2", fin_wait2, t3, t4)
            within("the server's CLOSE_WAIT", close_wait, t3, t4)

            # CLOSE_WAIT -> LAST_ACK is made by the server's shutdown(), not by a segment, and
            # must read the clock itself: its CLOSE_WAIT lasted the quiet second at least (with
            # the socket's stamp, it would read as ~0).  Then LAST_ACK -> CLOSE, on the ACK,
            # where the record ends: its lifetime (whole microseconds) gives the time.
            totals = poller.read_totals(t)
            before, lived = totals.state_hist(CLOSE_WAIT), totals.lifetime(PASSIVE)
            time.sleep(QUIET_S)
            t5 = time.monotonic_ns()
            acc.shutdown(socket.SHUT_WR)
            wait_until(lambda: poller.read_totals(t).lifetime(PASSIVE).count > lived.count, 10,
                       "the server's connection to end")
            t6 = time.monotonic_ns()
            totals = poller.read_totals(t)
            after, ended = totals.state_hist(CLOSE_WAIT), totals.lifetime(PASSIVE)
            assert ended.count == lived.count + 1
            _, socks = reads.read_socks(t)
            assert not ((socks["lport"] == sport) & (socks["rport"] == cport)).any(), "the record ends at CLOSE"
            # The lifetime is truncated to whole microseconds: within() allows 1 us before t5.
            within("the server's CLOSE", born + (ended.sum_us - lived.sum_us) * 1000, t5, t6)
            assert after.count > before.count
            # (sums are in whole microseconds: 1 us of slack)
            assert after.sum_us - before.sum_us >= (t5 - close_wait) / 1000 - 1, \
                f"CLOSE_WAIT dwell {(after.sum_us - before.sum_us) / 1e6:.3f} s, held {(t5 - close_wait) / 1e9:.3f} s"
        finally:
            for s in (cli, acc, lsn):
                if s is not None:
                    s.close()
