"""The join of sock_diag rows with the socket table, a chunk of rows at a
time, against a per-row reading of the same records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytracer.inventory import sockdiag
from pytracer.kernel import abi
from pytracer.leaks import facts
from pytracer.table import poll


@pytest.mark.parametrize("chunk", [1, 5, 8192])
def test_each_row_gets_its_own_records_time_and_accepted(chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(facts, "FACTS_CHUNK", chunk)
    rng = np.random.default_rng(11)
    keys = rng.permutation(np.arange(1000, 1200, dtype=np.uint64))  # the table, in hash order
    socks = np.zeros(len(keys), poll.NARROW_DTYPE)
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
    exact, bound, accepted, matched = facts.join_table(rows, snap, now_ns, key_by_ptr=False)
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
    assert matched.sum() == len(set(keys.tolist()) & set(rows["cookie"].tolist())) > 10
