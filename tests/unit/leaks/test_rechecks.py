"""Rechecks are the history's own next-check times: the due ones by cookie,
their lookup keys and times from the table."""

from __future__ import annotations

import numpy as np

from pytracer.inventory import sockdiag
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.facts import History
from pytracer.leaks.incremental import due_index
from pytracer.table import poll, reads

EST = int(TcpState.ESTABLISHED)


def _snap(cookies: list[int]) -> poll.Snapshot:
    socks = np.zeros(len(cookies), reads.NARROW_DTYPE)
    socks["state"] = EST
    socks["lport"] = np.arange(len(cookies)) + 1000
    socks["netns_ino"] = 4026531840
    return poll.Snapshot(0, 0.0, None, np.array(cookies, np.uint64), socks, 0.0)  # type: ignore[arg-type]


def _history(cookies: list[int], not_before: list[float], states: list[int] | None = None) -> History:
    """A history as a full scan at t=100 leaves it: ``not_before`` 0 means never asked."""
    rows = np.zeros(len(cookies), sockdiag.INV_DTYPE)
    rows["cookie"] = cookies
    rows["state"] = states or [EST] * len(cookies)
    h = History()
    hist = h.carry(rows, now=100.0)
    for i, t in enumerate(not_before):
        if t:
            hist.put("not_before", i, t)
    h.store(rows, hist)
    return h


def test_due_rechecks_are_the_asked_established_sockets_whose_time_has_come() -> None:
    # 40 never asked (-inf: not a recheck), 50 not ESTABLISHED, 30 not yet due.
    h = _history([30, 10, 20, 40, 50], [150.0, 110.0, 120.0, 0.0, 105.0], [EST, EST, EST, EST, 8])
    assert h.due_rechecks(99.0).tolist() == []
    assert h.due_rechecks(125.0).tolist() == [10, 20]
    assert h.due_rechecks(200.0).tolist() == [10, 20, 30]
    # Asked by a candidate scan and not answered: left out until the next full scan.
    assert h.due_rechecks(200.0, np.array([20], np.uint64)).tolist() == [10, 30]
    assert History().due_rechecks(200.0).tolist() == []


def test_a_candidate_scans_merge_moves_the_next_check() -> None:
    h = _history([10, 20], [110.0, 120.0])
    rows = np.zeros(1, sockdiag.INV_DTYPE)
    rows["cookie"], rows["state"] = 10, EST
    hist = h.carry(rows, now=130.0)
    hist.put("not_before", 0, 400.0)  # answered: not idle long enough yet
    h.merge(rows, hist)
    assert h.due_rechecks(130.0).tolist() == [20]
    assert h.due_rechecks(400.0).tolist() == [10, 20]


def test_due_ones_are_found_in_the_table_once_and_gone_ones_dropped() -> None:
    # 20 has ended (not in the table), 10 is there twice (read from both maps): once.
    snap = _snap([99, 10, 77, 10])
    at = due_index(np.array([10, 20], np.uint64), snap)
    assert at.tolist() == [1] and snap.socks["lport"][at].tolist() == [1001]
    assert due_index(np.zeros(0, np.uint64), snap).tolist() == []
