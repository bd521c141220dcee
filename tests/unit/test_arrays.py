"""pytracer.arrays: the shared search helpers."""

from __future__ import annotations

import numpy as np

from pytracer.arrays import find_sorted, is_sorted


def test_find_sorted_and_is_sorted() -> None:
    keys = np.array([2, 4, 4, 9], np.uint64)
    pos, hit = find_sorted(keys, np.array([4, 1, 9, 10, 2], np.uint64))
    assert hit.tolist() == [True, False, True, False, True]
    assert keys[pos[hit]].tolist() == [4, 9, 2] and int(pos.max()) <= 3
    pos, hit = find_sorted(np.zeros(0, np.uint64), np.array([1, 2], np.uint64))
    assert pos.tolist() == [0, 0] and not hit.any()
    assert is_sorted(keys) and is_sorted(keys[:0]) and not is_sorted(keys[::-1])
