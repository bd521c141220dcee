"""Read the kernel maps into snapshots, in batches, without per-socket Python.

The per-CPU aggregate is one lookup summed with numpy; the socket table is
one BPF_MAP_LOOKUP_BATCH walk viewed as a numpy structured array whose dtype
comes from :class:`pytracer.kernel.abi.PtSock`.

A poll loop keeps one :class:`SockBuffers`: the kernel then writes the table
straight into arrays sized for the map's capacity, allocated once, and a
whole read is one batch call with no copy in Python.  Only the pages the
table fills are resident.  The views and the leak scans read it *narrow*
instead (:data:`NARROW_DTYPE`, 20 of a record's 152 bytes: the times,
states and counters their whole-table selections compare), a chunk of
:data:`READ_CHUNK` records at a time.  What needs other columns of every
record (``tracer watch``'s counts and top-N lists) is reduced a chunk at a
time as the table is read (``TablePoller(reducer=...)``), and the few
records a view shows or a scan selects are read again whole, by cookie
(:meth:`Snapshot.record`, :meth:`Snapshot.records_at`).

The aggregates cost the same at 10 or 1M sockets; the table costs in
proportion to its records (~40 ms at 100k here).  :class:`TablePoller` reads
the aggregates every interval and the table only as often as a duty cycle
allows, so a report on a host with many idle sockets costs a fraction of a
percent of a core; see :func:`live_delta` for the state counts in between.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np

from pytracer.arrays import fields_of, find_sorted
from pytracer.kernel import abi
from pytracer.kernel.abi import Stat
from pytracer.kernel.histogram import Histogram

SOCK_DTYPE = np.dtype(abi.PtSock)
# A nursery slot (pytracer.h: pt_slot): key 0 is a free slot.
SLOT_DTYPE = np.dtype([("key", np.uint64), ("rec", SOCK_DTYPE)])
# The columns a poll keeps of each record: what the leak scans compare over
# the whole table (their selection, the join with sock_diag, the reaper, the
# carried idle flags, the live counts, the listeners by port).  20 bytes of
# 152, packed (28 a socket with its key: 2.7 MiB at 100k).  The view's
# counts and rankings are reduced as the table is read (TablePoller's
# reducer); the records a report shows or a scan selects are read again
# whole, by cookie (Snapshot.record, Snapshot.records_at).
NARROW_FIELDS = ("state_ns", "netns_ino", "lport", "transitions", "state", "flags", "counted", "accepted")
NARROW_DTYPE = fields_of(SOCK_DTYPE, NARROW_FIELDS)
READ_CHUNK = 4096  # records per batch of a chunked read (~0.6 MB of whole records)
# What a scan reads of the records it selects, read again by cookie
# (Snapshot.records_at): lookup keys, times, owner and listener.  63 bytes
# of 152: a leak pile's recheck can select every socket at once.
PICK_FIELDS = ("state_ns", "netns_ino", "owner_tgid", "listener_tgid", "transitions", "family", "lport", "rport",
               "state", "flags", "accepted", "laddr", "raddr")
PICK_DTYPE = fields_of(SOCK_DTYPE, PICK_FIELDS)
# Records read again by cookie one lookup each (two syscalls) up to this
# many; more are picked in one chunked walk of the table (~40 ms at 100k).
PICK_LOOKUPS = 512
# The most rows of a walk of "socks" that buffers keeping their walk hold
# (SockBuffers(keep_walk=True); ~2.5 MB of whole records).  A walk costs its
# buckets (~1.5 ms for 262,144 here) however few records they hold: in a
# storm every record lives in the nursery, and "socks" holds only the
# host's long-lived sockets.  A larger table is walked every time.
WALK_KEEP_MAX = 16384
_AGG_WORDS = ctypes.sizeof(abi.PtAgg) // 8
_HIST_WORDS = abi.PT_HIST_SLOTS + 1


class Reducer(Protocol):
    """Work over every record of a table read, done a chunk at a time as
    the table is read (``start``, ``add`` per chunk of whole records with
    the index of its first row, ``finish`` with the read's time)."""

    def start(self) -> None: ...

    def add(self, first: int, keys: np.ndarray, recs: np.ndarray) -> None: ...

    def finish(self, table_mono_ns: int) -> Any: ...


class MapSource(Protocol):
    """What the poller needs from a loaded tracer (CO-RE or bcc backend);
    a source with a ``nursery_slots`` attribute above 0 keeps its youngest
    records in the "nursery" map, in front of "socks"."""

    ncpus: int

    def map(self, name: str): ...


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


class SockBuffers:
    """Reusable destination of socket-table reads.

    The arrays a read returns are views into these buffers: they stay valid
    until the next read through the same SockBuffers.  Sized for the map's
    max_entries (a hash map never holds more), so one pass always fits;
    they grow only if a map reports more.
    """

    def __init__(self, keep_walk: bool = False) -> None:
        """``keep_walk``: keep the rows of a walk of "socks" (up to
        WALK_KEEP_MAX), and read them again instead of the table for as long
        as its source says it has not changed (:func:`table_generation`)."""
        self.keys = np.zeros(0, np.uint64)
        self.socks = np.zeros(0, SOCK_DTYPE)
        self._mapped: tuple[tuple[int, int], mmap.mmap] | None = None
        self.keep_walk = keep_walk
        self._kept: tuple[int, np.ndarray, np.ndarray] | None = None
        self._walked_rows = 0  # rows of the last walk
        self.walks = 0  # walks of "socks" made
        self.walks_skipped = 0  # reads that took the kept walk instead

    def read(self, src: MapSource, narrow: bool = False, reducer: Reducer | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(keys, records) of the whole table; ``narrow``: NARROW_DTYPE
        records, read a chunk at a time, so the whole records are never
        all held (a source without batched reads, bcc, returns whole ones),
        each chunk of whole records handed to ``reducer`` first."""
        m = src.map("socks")
        if narrow and getattr(m, "batches", None) is not None:
            return self._read_narrow(src, m, reducer)
        nursery, first = self.nursery_first(src)
        want = max(int(m.max_entries), 1) + nursery
        # Bounded: each failed pass doubles the buffers.
        for _ in range(32):
            if len(self.keys) < want or self.socks.dtype != SOCK_DTYPE:
                self.keys = np.empty(want, np.uint64)
                self.socks = np.empty(want, SOCK_DTYPE)
            done, n = m.dump_into(self.keys, self.socks, SOCK_DTYPE.itemsize)
            if done and len(self.keys) - n >= nursery:
                break
            want = len(self.keys) * 2
        else:
            raise RuntimeError("the socket table kept outgrowing the read buffers")
        if first is not None:
            n = self._add_nursery(first, nursery, n)
        return self.keys[:n], self.socks[:n]

    def _read_narrow(self, src: MapSource, m, reducer: Reducer | None = None) -> tuple[np.ndarray, np.ndarray]:
        slots = int(getattr(src, "nursery_slots", 0) or 0)
        want = max(int(m.max_entries), 1) + slots
        if len(self.keys) < want or self.socks.dtype != NARROW_DTYPE:
            # Resident only as written: the pages of the rows a read fills.
            self.keys = np.empty(want, np.uint64)
            self.socks = np.empty(want, NARROW_DTYPE)
        if reducer is not None:
            reducer.start()
        n = 0
        for keys, recs in self.chunks(src):
            c = len(keys)
            if n + c > len(self.keys):  # a walk that met more than max_entries (bounded: doubles)
                self.keys = np.concatenate([self.keys[:n], np.empty(len(self.keys), np.uint64)])
                self.socks = np.concatenate([self.socks[:n], np.empty(len(self.socks), NARROW_DTYPE)])
            self.keys[n : n + c] = keys
            # Fields by position: the narrow dtype lists them in NARROW_FIELDS' order.
            self.socks[n : n + c] = recs[list(NARROW_FIELDS)]
            if reducer is not None:
                reducer.add(n, keys, recs)
            n += c
        return self.keys[:n], self.socks[:n]

    def chunks(self, src: MapSource, chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, whole records) of the table, ``chunk`` records at a time
        (READ_CHUNK), views valid until the next one; each socket once.

        The nursery is copied first and comes last: a record that moves out
        of its slot while "socks" is walked is in that copy, whether or not
        the walk met it too (then the walk's row is dropped, found by its
        slot).  Read the other way round, a storm's moves go missing from
        every read."""
        m = src.map("socks")
        slots, first = self.nursery_first(src)
        copied = by_slot(first[0], slots) if first is not None and len(first[0]) else None
        for keys, recs in self._walk(src, m, chunk or READ_CHUNK):
            if copied is not None:
                keep = ~in_nursery(copied, keys)
                if not keep.all():
                    keys, recs = keys[keep], recs[keep]
            yield keys, recs
        if first is not None and len(first[0]):
            yield first

    def _walk(self, src: MapSource, m, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, whole records) of a walk of "socks", ``chunk`` at a time;
        with ``keep_walk``, the kept rows of the last walk instead while the
        table's generation is where it was when that walk began.  Called
        after the nursery is copied: a record that moved out of its slot
        since that copy has changed the generation, so it is walked."""
        gen = table_generation(src) if self.keep_walk else None
        kept = self._kept
        if gen is not None and kept is not None and kept[0] == gen:
            self.walks_skipped += 1
            for i in range(0, len(kept[1]), chunk):
                yield kept[1][i : i + chunk], kept[2][i : i + chunk]
            return
        self._kept = None
        self.walks += 1
        # Rows are copied only when the last walk fitted the bound: a walk
        # that does not is never kept, and the last one's size predicts it;
        # before the first, the records seeding wrote do (at 100k, the first
        # walk would copy 16,384 whole records, 2.4 MB, only to drop them).
        last = self._walked_rows if self.walks > 1 else int(getattr(src, "seeded_records", 0) or 0)
        keep = gen is not None and last <= WALK_KEEP_MAX
        parts: list[tuple[np.ndarray, np.ndarray]] | None = [] if keep else None
        rows = 0
        for kbuf, vbuf, n in m.batches(SOCK_DTYPE.itemsize, chunk):
            keys = np.frombuffer(kbuf, np.uint64, count=n)
            recs = np.frombuffer(vbuf, SOCK_DTYPE, count=n)
            rows += n
            if parts is not None:
                if rows <= WALK_KEEP_MAX:
                    parts.append((keys.copy(), recs.copy()))
                else:
                    parts = None
            yield keys, recs
        self._walked_rows = rows
        if parts is not None:  # the whole walk was read (a reader may stop early)
            keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
            recs = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, SOCK_DTYPE)
            keys.flags.writeable = recs.flags.writeable = False
            self._kept = (gen, keys, recs)

    def nursery_first(self, src: MapSource) -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
        """(the nursery's slots, its records) of ``src``, copied before a
        walk of "socks" (see :meth:`_add_nursery`); (0, None) without one."""
        slots = int(getattr(src, "nursery_slots", 0) or 0)
        return slots, (self.nursery_records(src.map("nursery"), slots) if slots else None)

    def _add_nursery(self, first: tuple[np.ndarray, np.ndarray], slots: int, n: int) -> int:
        """Append the nursery's records, read before the ``n`` rows of
        "socks"; how many rows there are then.

        The nursery is read first: a record that moves out of its slot
        while "socks" is walked is in that copy, whether or not the walk
        met it too (then the walk's row is dropped).  Read the other way
        round, a storm's moves go missing from every read."""
        keys, recs = first
        if len(keys) and n:
            dup = in_nursery(by_slot(keys, slots), self.keys[:n])
            if dup.any():
                keep = np.flatnonzero(~dup)
                n = len(keep)
                self.keys[:n] = self.keys[keep]
                self.socks[:n] = self.socks[keep]
        m = len(keys)
        self.keys[n : n + m] = keys
        self.socks[n : n + m] = recs if self.socks.dtype == SOCK_DTYPE else recs[list(NARROW_FIELDS)]
        return n + m

    def nursery_records(self, m, slots: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, records) of the nursery's occupied slots, copies.

        Read in place through a shared mapping (the map is BPF_F_MMAPABLE):
        no copy of the free slots, no system call.  A slot whose key changed
        while its record was copied (its socket ended, or a newer one took
        it), or that was freed before its key was copied, is left to the
        next read.  The map is created mappable wherever
        there is a nursery (v5.12+; BPF_F_MMAPABLE is v5.5)."""
        view = self._nursery_view(m, slots)
        live = np.flatnonzero(view["key"])
        keys = view["key"][live]
        recs = view["rec"][live]
        # A slot freed between the scan for keys and their copy reads 0.
        same = (view["key"][live] == keys) & (keys != 0)
        return keys[same], recs[same]

    def _nursery_view(self, m, slots: int) -> np.ndarray:
        fd = int(m.fd)
        if self._mapped is None or self._mapped[0] != (fd, slots):
            size = slots * SLOT_DTYPE.itemsize
            mm = mmap.mmap(fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ)
            self._mapped = ((fd, slots), mm)
        return np.frombuffer(self._mapped[1], SLOT_DTYPE, count=slots)


def table_generation(src: MapSource) -> int | None:
    """How many times ``src``'s "socks" has changed, by the kernel's
    writes and this process's own (``socks_generation()``), or None when it
    cannot say: then every read walks it."""
    read = getattr(src, "socks_generation", None)
    return None if read is None else read()


def by_slot(keys: np.ndarray, slots: int) -> np.ndarray:
    """A nursery read's keys laid out by slot (0: free): a cookie can only
    ever sit in slot ``cookie & (slots - 1)``."""
    out = np.zeros(slots, np.uint64)
    out[keys & np.uint64(slots - 1)] = keys
    return out


def in_nursery(slotted: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` (cookies, not 0) were in the nursery read that
    :func:`by_slot` laid out: one load per key, no sort, no search."""
    return slotted[keys & np.uint64(len(slotted) - 1)] == keys


def lookup_record(src: MapSource, cookie: int) -> np.ndarray | None:
    """One socket's record (a SOCK_DTYPE scalar copy), wherever it is:
    its nursery slot, else "socks"; None when it has none."""
    slots = int(getattr(src, "nursery_slots", 0) or 0)
    if slots:
        raw = src.map("nursery").lookup(struct.pack("=I", cookie & (slots - 1)), SLOT_DTYPE.itemsize)
        if raw is not None:
            slot = np.frombuffer(raw, SLOT_DTYPE)[0]
            if int(slot["key"]) == cookie:
                return slot["rec"].copy()
    raw = src.map("socks").lookup(struct.pack("=Q", cookie), SOCK_DTYPE.itemsize)
    return None if raw is None else np.frombuffer(raw, SOCK_DTYPE)[0].copy()


def live_states(socks: np.ndarray) -> np.ndarray:
    """Live records per state (PT_STATES,): the ones the kernel counted, or
    seeded from the inventory at start (seeded records stay out of the
    histograms, their birth being unknown, but they are live sockets).  Not
    counted: other processes' passive sockets under --pid, kept only until
    accept() names their owner."""
    live = (socks["counted"] != 0) | ((socks["flags"] & abi.PT_F_SEEDED) != 0)
    return np.bincount(socks["state"][live].astype(np.intp), minlength=abi.PT_STATES)[: abi.PT_STATES]


def count_socks(src: MapSource, buffers: SockBuffers | None = None, chunk: int = 4096) -> tuple[np.ndarray, int]:
    """(:func:`live_states`, records) of the whole table, read ``chunk``
    records at a time: a reader that needs only the counts (an export
    scrape) holds one chunk, ~0.6 MB, not the table (15 MB at 100k).
    ``buffers`` keeps the nursery's mapping between calls.  Sources
    without batched reads (bcc) read the whole table into ``buffers``."""
    buffers = buffers or SockBuffers()
    if getattr(src.map("socks"), "batches", None) is None:
        _, socks = buffers.read(src)
        return live_states(socks), len(socks)
    states = np.zeros(abi.PT_STATES, np.int64)
    total = 0
    for _, recs in buffers.chunks(src, chunk):
        states += live_states(recs)
        total += len(recs)
    return states, total


def pick_records(src: MapSource, cookies: np.ndarray, buffers: SockBuffers | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(found, records): which of ``cookies`` have a record now, and the
    :data:`PICK_FIELDS` of those records (PICK_DTYPE), in the order of
    ``cookies``.  Up to :data:`PICK_LOOKUPS` one lookup each; more in one
    chunked walk of the table, whatever their number (through ``buffers``'
    nursery mapping, when given: the walk touches none of their arrays)."""
    cookies = np.asarray(cookies, np.uint64)
    if len(cookies) <= PICK_LOOKUPS or getattr(src.map("socks"), "batches", None) is None:
        got = [lookup_record(src, int(c)) for c in cookies.tolist()]
        found = np.array([r is not None for r in got], bool)
        whole = np.zeros(int(found.sum()), SOCK_DTYPE)
        for j, r in enumerate(r for r in got if r is not None):
            whole[j] = r
        recs = np.zeros(len(whole), PICK_DTYPE)
        recs[:] = whole[list(PICK_FIELDS)]  # by position: PICK_DTYPE lists them in this order
        return found, recs
    wanted, inverse = np.unique(cookies, return_inverse=True)
    hit = np.zeros(len(wanted), bool)
    out = np.zeros(len(wanted), PICK_DTYPE)
    for keys, chunk in (buffers or SockBuffers()).chunks(src):
        pos, there = find_sorted(wanted, keys)
        hit[pos[there]] = True
        out[pos[there]] = chunk[there][list(PICK_FIELDS)]
    found = hit[inverse]
    return found, out[inverse[found]]


def read_socks(src: MapSource, buffers: SockBuffers | None = None, narrow: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """(keys, records) of the whole table (``narrow``: see SockBuffers.read).
    Without ``buffers`` the arrays are the caller's own (fresh buffers)."""
    return (buffers or SockBuffers()).read(src, narrow)


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


@dataclass
class Tree:
    """The process tree a tracer follows (``tracer run``): the tgids in the
    "owners" filter now, and the kernel's counts from the "tree" map."""

    pids: tuple[int, ...]
    followed: int  # forks whose child joined the filter
    exited: int  # processes that left it when their last thread exited
    full: int  # children not followed: the filter was full

    def to_json(self) -> dict[str, int]:
        return {"alive": len(self.pids), "followed": self.followed, "exited": self.exited,
                "not_followed_filter_full": self.full}


def read_tree(src: MapSource) -> Tree:
    """One batch read of "owners" and one lookup of "tree"."""
    keys, _, n = src.map("owners").dump(1)
    pids = tuple(sorted(np.frombuffer(keys, dtype=np.uint32, count=n).tolist()))
    raw = src.map("tree").lookup(struct.pack("=I", 0), ctypes.sizeof(abi.PtTree))
    t = abi.PtTree.from_buffer_copy(raw) if raw is not None else abi.PtTree()
    return Tree(pids, int(t.followed), int(t.exited), int(t.full))
