"""pytracer.arrays: the shared search helpers."""

from __future__ import annotations

import numpy as np

from pytracer.arrays import among, find_sorted, is_sorted


def test_find_sorted_and_is_sorted() -> None:
    keys = np.array([2, 4, 4, 9], np.uint64)
    pos, hit = find_sorted(keys, np.array([4, 1, 9, 10, 2], np.uint64))
    assert hit.tolist() == [True, False, True, False, True]
    assert keys[pos[hit]].tolist() == [4, 9, 2] and int(pos.max()) <= 3
    pos, hit = find_sorted(np.zeros(0, np.uint64), np.array([1, 2], np.uint64))
    assert pos.tolist() == [0, 0] and not hit.any()
    assert is_sorted(keys) and is_sorted(keys[:0]) and not is_sorted(keys[::-1])


def test_fields_of_keeps_the_named_fields_in_order_and_takes_them_by_position() -> None:
    from pytracer.arrays import fields_of

    whole = np.dtype([("a", "u8"), ("b", "u1"), ("c", "u2", (2,)), ("d", "i4")])
    narrow = fields_of(whole, ("d", "b"))
    assert narrow.names == ("d", "b") and narrow.itemsize == 5
    assert fields_of(whole, ("b", "a"), align=True).itemsize == 16
    src = np.zeros(3, whole)
    src["b"], src["d"] = [1, 2, 3], [-1, -2, -3]
    out = np.empty(3, narrow)
    out[:] = src[["d", "b"]]
    assert out["d"].tolist() == [-1, -2, -3] and out["b"].tolist() == [1, 2, 3]


def test_among_sorted_or_not() -> None:
    keys = np.array([5, 1, 9, 7, 0], np.uint64)
    for cookies in (np.array([1, 3, 7, 11], np.uint64), np.array([11, 7, 1, 3], np.uint64)):
        assert among(keys, cookies).tolist() == [False, True, False, True, False]
    assert among(keys, np.zeros(0, np.uint64)).tolist() == [False] * 5
    assert among(np.array([12], np.uint64), np.array([1, 3, 7, 11], np.uint64)).tolist() == [False]
