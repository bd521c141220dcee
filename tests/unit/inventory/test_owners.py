"""Which sockets are in scope for --pid and --port.  No kernel."""

from __future__ import annotations

import numpy as np

from pytracer.inventory.owners import scope_mask
from pytracer.inventory.procs import SocketOwners
from pytracer.inventory.sockdiag import INV_DTYPE
from pytracer.kernel.tcp_states import TcpState


def rows() -> np.ndarray:
    r = np.zeros(5, INV_DTYPE)
    # listener of pid 10 on 80; a socket it holds; one queued on its listener;
    # pid 20's socket to port 80 elsewhere; pid 20's socket on 443.
    r["state"] = [TcpState.LISTEN, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.ESTABLISHED,
                  TcpState.ESTABLISHED]
    r["lport"] = [80, 80, 80, 50000, 50001]
    r["rport"] = [0, 40000, 40001, 80, 443]
    r["inode"] = [100, 101, 0, 200, 201]
    return r


OWNERS = SocketOwners([100, 101, 200, 201], [10, 10, 20, 20], [3, 4, 5, 6])


def test_pids_ports_and_both() -> None:
    r = rows()
    assert scope_mask(r, OWNERS, []).tolist() == [True] * 5
    assert scope_mask(r, OWNERS, [10]).tolist() == [True, True, True, False, False]
    assert scope_mask(r, OWNERS, [], [80]).tolist() == [True, True, True, True, False]  # either end
    assert scope_mask(r, OWNERS, [20], [80]).tolist() == [False, False, False, True, False]
    assert scope_mask(r, OWNERS, [], [443, 9]).tolist() == [False, False, False, False, True]


def test_listeners_given_apart_scope_the_same_sockets() -> None:
    """A full scan's ESTABLISHED walk: the listeners are in the other rows."""
    r = rows()
    r["state"][2] = TcpState.ESTABLISHED  # queued on pid 10's listener, not yet accepted
    lst, rest = r[:1], r[1:]
    for pids, ports in (([], ()), ([10], ()), ([20], ()), ([10], (80,)), ([10, 20], (443,))):
        assert scope_mask(rest, OWNERS, pids, ports, lst).tolist() == scope_mask(r, OWNERS, pids, ports)[1:].tolist()
    assert scope_mask(rest, OWNERS, [10], (), lst).tolist() == [True, True, False, False]
    assert scope_mask(rest, OWNERS, [10], (), r[:0]).tolist() == [True, False, False, False]  # no listener: held only
