"""Histogram math against the kernel's slot rule, computed independently."""

from __future__ import annotations

import math
import random

import pytest

from pytracer.kernel.abi import PT_HIST_SLOTS
from pytracer.kernel.histogram import Histogram, log2_bounds_seconds, slot_lower_us, slot_of, slot_upper_us


def reference_slot(us: int) -> int:
    # The rule as the header states it, with floats instead of bit tricks.
    if us < 4:
        return us
    p = int(math.floor(math.log2(us)))
    while (1 << p) > us:  # guard float rounding near powers of two
        p -= 1
    sub = int((us - (1 << p)) / (1 << p) * 4)
    return min(4 * (p - 1) + sub, PT_HIST_SLOTS - 1)


@pytest.mark.parametrize(
    "us", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 999_999, 10**6, 2**40, 2**62]
)
def test_slot_matches_reference(us: int) -> None:
    assert slot_of(us) == reference_slot(us)


def test_slot_bounds_contain_value_and_are_at_most_25_percent_wide() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        us = rng.randrange(1, 2**40)
        s = slot_of(us)
        assert slot_lower_us(s) <= us < slot_upper_us(s)
        if us >= 4:
            assert (slot_upper_us(s) - slot_lower_us(s)) / slot_lower_us(s) <= 0.25


def test_slots_are_contiguous() -> None:
    for s in range(1, PT_HIST_SLOTS):
        assert slot_lower_us(s) == slot_upper_us(s - 1)


def test_powers_of_two_are_slot_boundaries() -> None:
    uppers = {slot_upper_us(s) for s in range(PT_HIST_SLOTS)}
    for le in log2_bounds_seconds():
        assert round(le * 1e6) in uppers


def hist_of(values_us: list[int]) -> Histogram:
    slots = [0] * PT_HIST_SLOTS
    for v in values_us:
        slots[slot_of(v)] += 1
    return Histogram(tuple(slots), sum(values_us))


def test_cumulative_is_monotonic_and_ends_at_count() -> None:
    h = hist_of([100, 2000, 2000, 5_000_000])
    cum = h.cumulative()
    counts = [c for _, c in cum]
    assert counts == sorted(counts) and counts[-1] == 4 and cum[-1][0] == math.inf
    # Exactly-bounded buckets: everything <= 4.096 ms is the first three values.
    b = dict(h.cumulative([0.004096]))
    assert b[0.004096] == 3


def test_quantile_falls_in_the_right_slot() -> None:
    values = [1000] * 50 + [1_000_000] * 50
    h = hist_of(values)
    q50 = h.quantile(0.5)
    assert slot_lower_us(slot_of(1000)) / 1e6 <= q50 <= slot_upper_us(slot_of(1000)) / 1e6
    q99 = h.quantile(0.99)
    assert slot_lower_us(slot_of(10**6)) / 1e6 <= q99 <= slot_upper_us(slot_of(10**6)) / 1e6
    assert Histogram.empty().quantile(0.5) is None


def test_delta_of_counters() -> None:
    a, b = hist_of([10, 20]), hist_of([10, 20, 30])
    d = b - a
    assert d.count == 1 and d.sum_us == 30
