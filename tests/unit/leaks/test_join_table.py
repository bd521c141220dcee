"""The join of sock_diag rows with the socket table, a chunk of rows at a
time, against a per-row reading of the same records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytracer.inventory import sockdiag
from pytracer.kernel import abi
from pytracer.leaks import facts
from pytracer.table import poll, reads


@pytest.mark.parametrize("chunk", [1, 5, 8192])
def test_each_row_gets_its_own_records_time_and_accepted(chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(facts, "FACTS_CHUNK", chunk)
    rng = np.random.default_rng(11)
    keys = rng.permutation(np.arange(1000, 1200, dtype=np.uint64))  # the table, in hash order
    socks = np.zeros(len(keys), reads.NARROW_DTYPE)
    socks["state"] = rng.integers(1, 4, len(keys))
    socks["state_ns"] = rng.integers(1, 50, len(keys)) * 10**9
    socks["flags"] = np.where(rng.random(len(keys)) < 0.3, abi.PT_F_SEEDED, 0)
    socks["transitions"] = rng.integers(0, 2, len(keys))
    socks["accepted"] = rng.integers(0, 2, len(keys))
    snap = poll.Snapshot(0, 0.0, None, keys, socks, 0.0)  # type: ignore[arg-type]
    rows = np.zeros(60, sockdiag.INV_DTYPE)
    rows["cookie"] = np.sort(rng.choice(np.arange(1100, 1300, dtype=np.uint64), 60, replace=False))
    rows["state"] = rng.integers(1, 4, 60)
    now_ns = 100 * 10**9
    times = facts.join_table(rows, snap, now_ns, key_by_ptr=False)
    exact, bound, accepted = times.exact(), times.bound(), times.accepted
    assert times.age.dtype == np.float64 and times.seeded.dtype == bool  # one time column for both
    matched = np.array([int(c) in set(keys.tolist()) for c in rows["cookie"].tolist()])
    table = {int(k): socks[i] for i, k in enumerate(keys.tolist())}
    for j, row in enumerate(rows):
        rec = table.get(int(row["cookie"]))
        assert bool(matched[j]) == (rec is not None)
        if rec is None:
            assert math.isnan(exact[j]) and math.isnan(bound[j]) and accepted[j] == -1
            continue
        assert accepted[j] == int(rec["accepted"])
        age = (now_ns - int(rec["state_ns"])) / 1e9
        seeded = bool(int(rec["flags"]) & abi.PT_F_SEEDED) and int(rec["transitions"]) == 0
        same = int(rec["state"]) == int(row["state"])
        assert (exact[j] == age) if same and not seeded else math.isnan(exact[j])
        assert (bound[j] == age) if same and seeded else math.isnan(bound[j])
    assert times.matched == matched.sum() == len(set(keys.tolist()) & set(rows["cookie"].tolist())) > 10


def test_table_times_keep_exact_and_bound_in_one_column() -> None:
    nan = np.nan
    exact = np.array([5.0, nan, nan, 400.0, nan])
    bound = np.array([nan, 7.0, nan, nan, 900.0])
    times = facts.TableTimes.of(exact, bound, np.array([1, 0, -1, 1, 0]))
    assert times.seeded.tolist() == [False, True, False, False, True]
    for got, want in ((times.exact(), exact), (times.bound(), bound), (times.exact([3, 1]), exact[[3, 1]])):
        assert np.array_equal(got, want, equal_nan=True)
    assert math.isnan(float(times.exact(1))) and float(times.bound(4)) == 900.0  # one row, as sock_facts asks
    # Known exactly to be younger: a bound says nothing of that, nor does no record.
    assert times.younger_than(300.0).tolist() == [True, False, False, False, False]
    assert times.accepted.dtype == np.int8 and times.accepted.tolist() == [1, 0, -1, 1, 0]


def test_candidates_ask_through_the_established_index_itself_when_no_stuck_socket_is_asked() -> None:
    from pytracer.leaks.detectors import Thresholds

    rows = np.zeros(6, sockdiag.INV_DTYPE)
    rows["cookie"], rows["state"] = np.arange(1, 7), 1  # ESTABLISHED
    n = len(rows)
    times = facts.TableTimes(np.full(n, np.nan), np.zeros(n, bool), np.full(n, -1, np.int8))
    times.age[2] = 1.0  # known young: not a candidate
    hist = facts.History().carry(rows, 50.0)
    stuck, est, query = facts.candidates(Thresholds(), rows, np.ones(n, bool), times, hist, {}, 50.0)
    assert len(stuck) == 0 and est.tolist() == [0, 1, 3, 4, 5] and query is est  # held once, not twice
