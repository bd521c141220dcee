"""A full scan's ESTABLISHED sockets judged a datagram at a time: what is
counted as they come equals the count over all of them at once.  No kernel."""

from __future__ import annotations

import numpy as np
import pytest

from pytracer.inventory import services, sockdiag
from pytracer.inventory.procs import SocketOwners
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks import facts as joins
from pytracer.leaks.detectors import Thresholds
from pytracer.leaks.established import Established
from pytracer.leaks.idle_carry import IdleCarry

EST, LISTEN = int(TcpState.ESTABLISHED), int(TcpState.LISTEN)


def _rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    rows = np.zeros(n, sockdiag.INV_DTYPE)
    rows["cookie"] = rng.permutation(np.arange(100, 100 + n))
    rows["state"] = EST
    rows["lport"] = rng.choice([80, 443, 40000, 40001, 40002], n)  # 80 and 443 listen
    rows["rport"] = rng.choice([5432, 6379, 80, 9000], n)
    rows["inode"] = np.where(rng.random(n) < 0.8, np.arange(1000, 1000 + n), 0)
    return rows


@pytest.mark.parametrize("per", [1, 7, 10_000])
def test_counts_per_process_and_remote_ports_as_over_every_row(per: int) -> None:
    rows = _rows(300)
    held = rows["inode"][rows["inode"] != 0]
    # Each socket held by one of three processes, some also by a second (a forked child).
    pids = (held % 3).astype(np.int64) + 10
    extra = held[::5]
    owners = SocketOwners(np.concatenate([held, extra]), np.concatenate([pids, np.full(len(extra), 99)]),
                          np.arange(len(held) + len(extra)) + 3)
    listening = np.array([80, 443], np.uint16)
    lst = np.zeros(2, sockdiag.INV_DTYPE)
    lst["state"], lst["lport"] = LISTEN, listening
    est = Established(Thresholds(), joins.History(), IdleCarry(), None, 100.0, 0, False, owners, (), (), lst, {}, {},
                      100, listening)
    for start in range(0, len(rows), per):
        est.add(rows[start : start + per].copy(), lambda wanted, brief=None: TcpInfoTable(brief))
    est.finish()
    want_pids, want_n = owners.held_counts(held)
    assert est.held == dict(zip(want_pids.tolist(), want_n.tolist()))
    whole = services.from_rows(np.concatenate([lst, rows]))
    assert services.from_rows(lst, remote=est.remote()) == whole
    assert est.rows == len(rows) and est.states[EST] == len(rows) and est.index is None
    # Nothing answered: every one was asked, none judged; the history keeps every row.
    assert est.queries == len(rows) and est.answered == 0 and not est.facts
    assert sorted(np.concatenate(est.parts["cookie"]).tolist()) == sorted(rows["cookie"].tolist())
