"""IdleCarry: which idle flags are carried between rechecks (pure logic, a
hand-made table snapshot)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import Flag
from pytracer.leaks.idle_carry import IdleCarry
from pytracer.table.reads import SOCK_DTYPE

NONE = np.zeros(0, np.uint64)


def table(*recs: tuple[int, TcpState, int]) -> SimpleNamespace:
    socks = np.zeros(len(recs), SOCK_DTYPE)
    socks["state"] = [int(st) for _, st, _ in recs]
    socks["state_ns"] = [ns for _, _, ns in recs]
    return SimpleNamespace(keys=np.array([c for c, _, _ in recs], np.uint64), socks=socks)


def idle(cookie: int, seconds: float) -> Flag:
    return Flag(kind="idle_established", cookie=cookie, state="ESTABLISHED", seconds=seconds, idle_seconds=seconds)


def test_carried_while_the_table_shows_no_change() -> None:
    c = IdleCarry()
    snap = table((1, TcpState.ESTABLISHED, 100), (2, TcpState.ESTABLISHED, 200), (3, TcpState.CLOSE_WAIT, 5))
    first = c.merge([idle(1, 400), idle(2, 900)], np.array([1, 2], np.uint64), snap)
    assert [f.cookie for f in first] == [2, 1]  # longest first, as detectors.ordered()
    again = c.merge([], NONE, snap)
    assert again is first and c.carried == 2  # nothing changed: the same list, nothing rebuilt

    moved = table((1, TcpState.ESTABLISHED, 100), (2, TcpState.ESTABLISHED, 201))  # 2 changed state since
    assert [f.cookie for f in c.merge([], NONE, moved)] == [1]
    gone = table((2, TcpState.ESTABLISHED, 201))  # 1 destroyed: its record is gone
    assert c.merge([], NONE, gone) == []


def test_asked_again_replaces_the_carried_flag() -> None:
    c = IdleCarry()
    snap = table((1, TcpState.ESTABLISHED, 100), (2, TcpState.ESTABLISHED, 200))
    c.merge([idle(1, 400), idle(2, 900)], np.array([1, 2], np.uint64), snap)
    # 1 was measured again and is busy now (no flag); 2 measured again, idle longer.
    out = c.merge([idle(2, 960)], np.array([1, 2], np.uint64), snap)
    assert [(f.cookie, f.seconds) for f in out] == [(2, 960)] and c.carried == 0


def test_sockets_the_table_does_not_hold_are_carried_until_a_full_scan_misses_them() -> None:
    c = IdleCarry()
    c.merge([idle(7, 400)], np.array([7], np.uint64), table((1, TcpState.ESTABLISHED, 1)))
    assert [f.cookie for f in c.merge([], NONE, table((1, TcpState.ESTABLISHED, 1)))] == [7]
    assert [f.cookie for f in c.merge([], NONE, None)] == [7]
    assert c.merge([], NONE, None, listed=np.array([1, 2], np.uint64)) == []


def test_without_a_table_what_it_held_is_not_carried() -> None:
    c = IdleCarry()
    c.merge([idle(1, 400)], np.array([1], np.uint64), table((1, TcpState.ESTABLISHED, 100)))
    assert c.merge([], NONE, None) == []


def test_at_most_limit_the_longest_idle_kept() -> None:
    c = IdleCarry()
    snap = table(*((i, TcpState.ESTABLISHED, i) for i in range(1, 6)))
    out = c.merge([idle(i, 100 * i) for i in range(1, 6)], np.arange(1, 6, dtype=np.uint64), snap, limit=3)
    assert [f.cookie for f in out] == [5, 4, 3] and len(c) == 3


def test_asked_among_names_the_carried_cookies_a_full_scan_asked() -> None:
    c = IdleCarry()
    assert c.asked_among(np.array([1, 2], np.uint64), np.array([0, 1])).tolist() == []  # nothing carried
    snap = table(*((k, TcpState.ESTABLISHED, 100) for k in (3, 7, 9, 12)))
    c.merge([idle(k, 400) for k in (3, 7, 9, 12)], np.array([3, 7, 9, 12], np.uint64), snap)
    listed = np.array([1, 3, 5, 7, 9, 11], np.uint64)  # 12 is not listed (gone)
    rng = np.random.default_rng(7)
    for _ in range(50):  # against the cookies of every asked row, as a full scan once kept them
        asked = np.flatnonzero(rng.random(len(listed)) < 0.5)
        want = np.intersect1d(c.cookies, listed[asked])
        assert sorted(c.asked_among(listed, asked).tolist()) == want.tolist()
        after_small = IdleCarry()
        after_small.merge([idle(k, 400) for k in (3, 7, 9, 12)], np.array([3, 7, 9, 12], np.uint64), snap)
        after_whole = IdleCarry()
        after_whole.merge([idle(k, 400) for k in (3, 7, 9, 12)], np.array([3, 7, 9, 12], np.uint64), snap)
        small = after_small.merge([], after_small.asked_among(listed, asked), snap, listed=listed)
        whole = after_whole.merge([], listed[asked], snap, listed=listed)
        assert [f.cookie for f in small] == [f.cookie for f in whole]
    assert c.asked_among(listed, np.zeros(0, np.intp)).tolist() == []
