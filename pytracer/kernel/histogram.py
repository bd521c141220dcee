"""Pure histogram math for the kernel's log-linear microsecond slots.

The kernel (bpf/pytracer.bpf.c, hist_slot) puts a duration of ``us``
microseconds in slot ``us`` when ``us < 4``, otherwise in slot
``4 * (p - 1) + ((us >> (p - 2)) & 3)`` with ``p = floor(log2(us))``: four
sub-buckets per power of two, so every bucket is at most 25% wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pytracer.kernel.abi import PT_HIST_SLOTS


def slot_of(us: int) -> int:
    """The slot the kernel uses for ``us`` (a mirror, for tests and seeding)."""
    if us < 4:
        return int(us)
    p = us.bit_length() - 1
    slot = 4 * (p - 1) + ((us >> (p - 2)) & 3)
    return min(slot, PT_HIST_SLOTS - 1)


def slot_upper_us(slot: int) -> int:
    """Exclusive upper bound of a slot in microseconds."""
    if slot < 4:
        return slot + 1
    p = slot // 4 + 1
    sub = slot % 4
    return (5 + sub) << (p - 2)


def slot_lower_us(slot: int) -> int:
    if slot < 4:
        return slot
    p = slot // 4 + 1
    sub = slot % 4
    return (4 + sub) << (p - 2)


@dataclass(frozen=True)
class Histogram:
    """Slot counts (non-cumulative) and the sum of observed microseconds."""

    slots: tuple[int, ...]
    sum_us: int

    @classmethod
    def empty(cls) -> Histogram:
        return cls(tuple([0] * PT_HIST_SLOTS), 0)

    @property
    def count(self) -> int:
        return sum(self.slots)

    def __sub__(self, other: Histogram) -> Histogram:
        return Histogram(tuple(a - b for a, b in zip(self.slots, other.slots)), self.sum_us - other.sum_us)

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(tuple(a + b for a, b in zip(self.slots, other.slots)), self.sum_us + other.sum_us)

    def cumulative(self, bounds_seconds: Sequence[float] | None = None) -> list[tuple[float, int]]:
        """``[(le_seconds, cumulative_count), ...]`` ending with +Inf.

        Without ``bounds_seconds`` every non-empty span of slots is reported
        at its exact slot bound.  With bounds, each must fall on a slot
        boundary to be exact; counts are attributed by slot upper bound.
        """
        out: list[tuple[float, int]] = []
        if bounds_seconds is None:
            last = max((i for i, c in enumerate(self.slots) if c), default=-1)
            first = min((i for i, c in enumerate(self.slots) if c), default=0)
            acc = 0
            for i in range(first, last + 1):
                acc += self.slots[i]
                out.append((slot_upper_us(i) / 1e6, acc))
        else:
            acc = 0
            i = 0
            for le in sorted(bounds_seconds):
                le_us = le * 1e6
                while i < PT_HIST_SLOTS and slot_upper_us(i) <= le_us + 1e-9:
                    acc += self.slots[i]
                    i += 1
                out.append((le, acc))
        out.append((float("inf"), self.count))
        return out

    def quantile(self, q: float) -> float | None:
        """Estimated q-quantile in seconds (linear within a slot), or None."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        acc = 0
        for i, c in enumerate(self.slots):
            if c == 0:
                continue
            if acc + c >= rank:
                lo, hi = slot_lower_us(i), slot_upper_us(i)
                frac = (rank - acc) / c
                return (lo + (hi - lo) * frac) / 1e6
            acc += c
        return slot_upper_us(PT_HIST_SLOTS - 1) / 1e6

    def mean_seconds(self) -> float | None:
        total = self.count
        return self.sum_us / total / 1e6 if total else None


def log2_bounds_seconds(lo_us: int = 64, hi_us: int = 1 << 34) -> list[float]:
    """Powers of two in microseconds, in seconds: exact on slot boundaries."""
    out = []
    v = lo_us
    while v <= hi_us:
        out.append(v / 1e6)
        v <<= 1
    return out
