"""Read the kernel maps into snapshots, in batches, without per-socket Python.

The per-CPU aggregate is one lookup summed with numpy (:class:`Totals`);
the socket table is read through :mod:`pytracer.table.reads`, whole or
narrow, a chunk at a time, each chunk handed to a reducer as it is read
(``tracer watch``'s counts and top-N lists); a :class:`Snapshot` reads the
few records a view shows or a scan selects again whole, by cookie
(:meth:`Snapshot.record`, :meth:`Snapshot.records_at`).

The aggregates cost the same at 10 or 1M sockets; the table costs in
proportion to its records (~40 ms at 100k here).  :class:`TablePoller` reads
the aggregates every interval and the table only as often as a duty cycle
allows, so a report on a host with many idle sockets costs a fraction of a
percent of a core; see :func:`live_delta` for the state counts in between.
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pytracer.kernel import abi
from pytracer.kernel.abi import Stat
from pytracer.kernel.histogram import Histogram
from pytracer.table.reads import (
    NARROW_DTYPE,
    SOCK_DTYPE,
    MapSource,
    Reducer,
    SockBuffers,
    lookup_record,
    pick_records,
)

_AGG_WORDS = ctypes.sizeof(abi.PtAgg) // 8
_HIST_WORDS = abi.PT_HIST_SLOTS + 1


@dataclass
class Totals:
    """Kernel aggregates summed over CPUs.  Every value only goes up."""

    stats: np.ndarray  # (PT_STATS,) uint64
    transitions: np.ndarray  # (PT_STATES, PT_STATES) uint64, [old][new]
    hists: np.ndarray  # (PT_HISTS, PT_HIST_SLOTS + 1) uint64; last column: sum_us

    def stat(self, s: abi.Stat, offset: int = 0) -> int:
        return int(self.stats[int(s) + offset])

    def hist(self, index: int) -> Histogram:
        row = self.hists[index]
        return Histogram(tuple(int(x) for x in row[: abi.PT_HIST_SLOTS]), int(row[abi.PT_HIST_SLOTS]))

    def lifetime(self, direction: abi.Direction) -> Histogram:
        return self.hist(abi.PT_HIST_LIFETIME + int(direction))

    def state_hist(self, state: int) -> Histogram:
        return self.hist(abi.PT_HIST_STATE + state)

    @classmethod
    def from_percpu(cls, raw: bytes, ncpus: int) -> Totals:
        stride = abi.percpu_stride(ctypes.sizeof(abi.PtAgg)) // 8
        words = np.frombuffer(raw, dtype=np.uint64, count=stride * ncpus).reshape(ncpus, stride)
        total = words[:, :_AGG_WORDS].sum(axis=0, dtype=np.uint64)
        i = 0
        stats = total[i : i + abi.PT_STATS]
        i += abi.PT_STATS
        trans = total[i : i + abi.PT_STATES * abi.PT_STATES].reshape(abi.PT_STATES, abi.PT_STATES)
        i += abi.PT_STATES * abi.PT_STATES
        hists = total[i : i + abi.PT_HISTS * _HIST_WORDS].reshape(abi.PT_HISTS, _HIST_WORDS)
        return cls(stats=stats, transitions=trans, hists=hists)


@dataclass
class Snapshot:
    mono_ns: int  # CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads
    wall: float
    totals: Totals
    keys: np.ndarray  # uint64 socket ids (cookies)
    socks: np.ndarray  # SOCK_DTYPE records
    read_seconds: float
    # When keys/socks were read, and the totals read with them: an older
    # table than the totals (see TablePoller).  0 / None: read together.
    table_mono_ns: int = 0
    table_totals: Totals | None = None
    # Where a narrow table (NARROW_DTYPE) was read from, for Snapshot.record.
    src: MapSource | None = None
    # The per-service aggregates (pytracer.table.services.read), when the
    # snapshot's reader read them this interval: a leak scan judging the
    # snapshot uses them instead of reading the maps again.
    services: list | None = None
    # What a TablePoller's reducer made of the table as it read it (for
    # tracer watch: the view's counts and top-N lists), or None.
    reduced: Any = None
    # The buffers the table was read through: a read again by cookie walks
    # with their nursery mapping instead of mapping the nursery anew (2.5
    # MiB of shared pages that RSS would count twice while the walk runs).
    buffers: SockBuffers | None = None

    def record(self, i: int) -> np.void | None:
        """Record ``i`` whole: from the table when it was read whole, else
        read again from the kernel by its cookie (now, so newer than the
        table); None when its socket has gone since the table was read."""
        if self.socks.dtype == SOCK_DTYPE:
            return self.socks[i]
        if self.src is None:
            return None
        return lookup_record(self.src, int(self.keys[i]))

    def records_at(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the rows of ``idx`` still there, their records): from the table
        when it was read whole, else read again from the kernel by cookie
        (:func:`pick_records`, PICK_DTYPE; now, so newer than the table).
        A socket gone since the table was read is left out."""
        idx = np.asarray(idx, np.intp)
        if self.socks.dtype == SOCK_DTYPE:
            return idx, self.socks[idx]
        if self.src is None or not len(idx):
            return idx[:0], np.zeros(0, SOCK_DTYPE)
        found, recs = pick_records(self.src, self.keys[idx], self.buffers)
        return idx[found], recs

    @property
    def table_age_seconds(self) -> float:
        return max(0, self.mono_ns - self.table_mono_ns) / 1e9 if self.table_mono_ns else 0.0


def live_delta(now: Totals, then: Totals) -> np.ndarray:
    """Change in live records per state between two reads of the counters
    (entered minus left; int64, may be negative).  Exact for every record
    the kernel counts: births, transitions, ends.  Seeded records that have
    not been counted and records user space reaps are not in it, so a view
    adds this to a table read's counts only until the next table read."""
    e, left = int(Stat.ENTERED), int(Stat.LEFT)
    cur = now.stats[e : e + abi.PT_STATES].astype(np.int64) - now.stats[left : left + abi.PT_STATES].astype(np.int64)
    old = then.stats[e : e + abi.PT_STATES].astype(np.int64) - then.stats[left : left + abi.PT_STATES].astype(np.int64)
    return cur - old


def read_totals(src: MapSource) -> Totals:
    """Sum of every CPU of every agg entry (see pt_agg in pytracer.h)."""
    size = abi.percpu_stride(ctypes.sizeof(abi.PtAgg)) * src.ncpus
    agg = src.map("agg")
    raws = [agg.lookup(struct.pack("=I", i), size) for i in range(abi.PT_AGG_ENTRIES)]
    if raws[0] is None:
        raise RuntimeError("the agg map has no entry 0")
    present = [r for r in raws if r is not None]
    return Totals.from_percpu(b"".join(present), src.ncpus * len(present))


def _reduced(reducer: Reducer | None, socks: np.ndarray, table_mono_ns: int) -> Any:
    """What ``reducer`` made of a read that returned ``socks``: it saw every
    chunk only where the table was read a chunk at a time (narrow)."""
    return reducer.finish(table_mono_ns) if reducer is not None and socks.dtype == NARROW_DTYPE else None


def snapshot(src: MapSource, with_socks: bool = True, buffers: SockBuffers | None = None,
             narrow: bool = False, reducer: Reducer | None = None) -> Snapshot:
    """Aggregates and (``with_socks``) the socket table, whole records or
    (``narrow``) NARROW_DTYPE ones, each chunk handed to ``reducer`` as it
    is read (its result is the snapshot's ``reduced``; a report of a narrow
    table needs :class:`pytracer.views.model.ViewReducer`'s).  With
    ``buffers`` the table arrays are views valid until the next read
    through them."""
    t0 = time.perf_counter()
    totals = read_totals(src)
    buffers = buffers or SockBuffers()
    if with_socks:
        keys, socks = buffers.read(src, narrow, reducer)
    else:
        keys, socks = np.zeros(0, np.uint64), np.zeros(0, SOCK_DTYPE)
    # Taken after the reads, so no record is younger than "now".
    mono = time.monotonic_ns()
    reduced = _reduced(reducer, socks, mono)
    return Snapshot(mono, time.time(), totals, keys, socks, time.perf_counter() - t0, table_mono_ns=mono,
                    table_totals=totals, src=src, reduced=reduced, buffers=buffers)


class TablePoller:
    """Snapshots for a view that reports every interval: the aggregates
    each time, the socket table when it is due.

    A table read is due when ``read cost / duty`` seconds have passed since
    the last one (its cost includes the view's own work on it, which the
    caller reports through :meth:`charge`), so reading the table takes at
    most ``duty`` of one core: every interval on a host with a few thousand
    sockets, about every 10 s at 100k.  ``max_age`` bounds how stale a
    table may get whatever it costs.  In between, snapshots carry the last
    table, with ``table_mono_ns`` and ``table_totals`` saying when it was
    read.
    """

    def __init__(self, src: MapSource, duty: float = 0.004, max_age: float = 30.0,
                 reducer: Reducer | None = None) -> None:
        self.src = src
        self.duty = duty
        self.max_age = max_age
        self.reducer = reducer
        self.buffers = SockBuffers(keep_walk=True)
        self._table: tuple[np.ndarray, np.ndarray, int, Totals, Any] | None = None
        self._cost = 0.0
        self.reads = 0

    def due(self, now_ns: int) -> bool:
        if self._table is None:
            return True
        age = (now_ns - self._table[2]) / 1e9
        return age >= min(self.max_age, self._cost / self.duty)

    def charge(self, seconds: float) -> None:
        """Add a view's own work on the last table read to that read's cost."""
        self._cost += max(0.0, seconds)

    def poll(self) -> Snapshot:
        t0 = time.perf_counter()
        totals = read_totals(self.src)
        if self.due(time.monotonic_ns()):
            keys, socks = self.buffers.read(self.src, narrow=True, reducer=self.reducer)
            mono = time.monotonic_ns()
            reduced = _reduced(self.reducer, socks, mono)
            self._table = (keys, socks, mono, totals, reduced)
            self._cost = time.perf_counter() - t0
            self.reads += 1
        else:
            mono = time.monotonic_ns()
        keys, socks, table_ns, table_totals, reduced = self._table  # type: ignore[misc]
        return Snapshot(mono, time.time(), totals, keys, socks, time.perf_counter() - t0,
                        table_mono_ns=table_ns, table_totals=table_totals, src=self.src, reduced=reduced,
                        buffers=self.buffers)
