"""Rechecks named by cookie: their lookup keys and times come from the table when due."""

from __future__ import annotations

import numpy as np

from pytracer.inventory import sockdiag
from pytracer.leaks.facts import History, TableTimes
from pytracer.leaks.incremental import Rechecks, due_index, rechecks_of
from pytracer.table import poll


def _snap(cookies: list[int]) -> poll.Snapshot:
    socks = np.zeros(len(cookies), poll.NARROW_DTYPE)
    socks["state"] = 1
    socks["lport"] = np.arange(len(cookies)) + 1000
    socks["netns_ino"] = 4026531840
    return poll.Snapshot(0, 0.0, None, np.array(cookies, np.uint64), socks, 0.0)  # type: ignore[arg-type]


def _rows(cookies: list[int]) -> np.ndarray:
    rows = np.zeros(len(cookies), sockdiag.INV_DTYPE)
    rows["cookie"] = cookies
    rows["state"] = 1
    return rows


def _rechecks(cookies: list[int], not_before: list[float], by_cookie: bool) -> Rechecks:
    rows = _rows(cookies)
    n = len(cookies)
    hist = History().carry(rows, now=100.0)
    for i, t in enumerate(not_before):
        if t:  # 0: never asked
            hist.put("not_before", i, t)
    times = TableTimes.of(np.full(n, 5.0), np.full(n, np.nan), np.ones(n, np.int8))
    return rechecks_of(rows, np.arange(n), hist, times, 100.0, by_cookie)


def test_by_cookie_keeps_16_bytes_each_and_finds_them_in_the_table() -> None:
    r = _rechecks([30, 10, 20, 40], [150.0, 110.0, 120.0, 0.0], by_cookie=True)  # 0: no next check
    assert r.by_cookie and r.rows.tolist() == [10, 20, 30]  # sorted by next check
    assert r.began is None and r.known_since is None and r.accepted is None  # the table says them
    due = r.pop_due(125.0)
    assert due.rows.tolist() == [10, 20] and r.rows.tolist() == [30] and r.not_before.tolist() == [150.0]
    # 20 has ended (not in the table), 10 is there twice (read from both maps): once.
    snap = _snap([99, 10, 77, 10])
    at = due_index(due, snap)
    assert at.tolist() == [1] and snap.socks["lport"][at].tolist() == [1001]
    assert due_index(Rechecks(np.zeros(0, np.uint64), np.zeros(0)), snap).tolist() == []


def test_lookup_keys_are_kept_whole_without_a_cookie_keyed_table() -> None:
    r = _rechecks([30, 10], [150.0, 110.0], by_cookie=False)
    assert r.rows.dtype == sockdiag.LOOKUP_DTYPE and not r.by_cookie
    due = r.pop_due(200.0)
    assert due.rows["cookie"].tolist() == [10, 30] and due.began.tolist() == [95.0, 95.0]
    assert due.accepted.tolist() == [1, 1] and np.isnan(due.known_since).all()


def test_added_to_an_empty_start_and_merged_in_order() -> None:
    r = Rechecks.empty()
    for i in range(300):  # past the tail's merge point
        r.add(_rechecks([1000 - i], [float(1000 - i)], by_cookie=True))
    due = r.pop_due(800.0)
    assert due.rows.dtype == np.uint64 and sorted(due.rows.tolist()) == list(range(701, 801))
    assert len(r) == 200
