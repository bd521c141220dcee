"""Read the kernel's socket table: whole, narrow, a chunk at a time, or by cookie.

The table is "socks" (one BPF_MAP_LOOKUP_BATCH walk, viewed as a numpy
structured array whose dtype comes from :class:`pytracer.kernel.abi.PtSock`)
and, where there is one, the "nursery" of the youngest records (read in
place through a shared mapping, copied before "socks" is walked: see
:meth:`SockBuffers.chunks`).  Each socket is read once either way.

A poll loop keeps one :class:`SockBuffers`: the kernel then writes the table
straight into arrays sized for the map's capacity, allocated once, and a
whole read is one batch call with no copy in Python.  Only the pages the
table fills are resident.  The views and the leak scans read it *narrow*
instead (:data:`NARROW_DTYPE`, 20 of a record's 152 bytes: the times,
states and counters their whole-table selections compare), a chunk of
:data:`READ_CHUNK` records at a time.  What needs other columns of every
record (``tracer watch``'s counts and top-N lists) is reduced a chunk at a
time as the table is read (a :class:`Reducer`), and the few records a view
shows or a scan selects are read again whole, by cookie
(:func:`lookup_record`, :func:`pick_records`).  A reader that needs only
the counts per state holds one chunk (:func:`count_socks`).

:mod:`pytracer.table.poll` puts these reads together with the kernel's
aggregates into snapshots.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, Iterator, Protocol

import numpy as np

from pytracer.arrays import fields_of, find_sorted
from pytracer.kernel import abi

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


class Reducer(Protocol):
    """Work over every record of a table read, done a chunk at a time as
    the table is read (``start``, ``add`` per chunk of whole records with
    the index of its first row, ``finish`` with the read's time)."""

    def start(self) -> None: ...

    def add(self, first: int, keys: np.ndarray, recs: np.ndarray) -> None: ...

    def finish(self, table_mono_ns: int) -> Any: ...


class MapSource(Protocol):
    """What a read needs from a loaded tracer (CO-RE or bcc backend);
    a source with a ``nursery_slots`` attribute above 0 keeps its youngest
    records in the "nursery" map, in front of "socks"."""

    ncpus: int

    def map(self, name: str): ...


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
            # One mapping per tracer, whichever buffers read it (libbpf.BpfObject.mapping).
            self._mapped = ((fd, slots), m.mapping(slots * SLOT_DTYPE.itemsize))
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
