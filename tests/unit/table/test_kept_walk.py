"""Buffers that keep their walk of "socks" (SockBuffers(keep_walk=True)):
the table is walked again only when its source says it changed."""

from __future__ import annotations

import numpy as np
import pytest

from pytracer.table import reads, writer

from .test_nursery_read import Storm


class Table:
    """A "socks" map and its source, no nursery: every write bumps the
    kernel's generation after it is made, as bpf/pytracer.bpf.c does."""

    nursery_slots = 0
    max_entries = 1 << 20

    def __init__(self, n: int) -> None:
        self.rows = {k: self.record(1) for k in range(1, n + 1)}
        self.kernel_gen = 0
        self.walks = 0
        self.counting = True

    record = staticmethod(Storm.record)

    def write(self, key: int, state: int | None) -> None:
        if state is None:
            del self.rows[key]
        else:
            self.rows[key] = self.record(state)
        self.kernel_gen += 1

    def map(self, name: str) -> Table:
        return self

    def socks_generation(self) -> int | None:
        return self.kernel_gen + getattr(self, "socks_writes", 0) if self.counting else None

    def batches(self, value_size: int, chunk: int):
        self.walks += 1
        items = sorted(self.rows.items())
        for i in range(0, len(items), chunk):
            part = items[i : i + chunk]
            keys = np.array([k for k, _ in part], np.uint64)
            vals = np.concatenate([v for _, v in part])
            yield memoryview(keys.tobytes()), memoryview(vals.tobytes()), len(part)


def states(buffers: reads.SockBuffers, t: Table) -> dict[int, int]:
    keys, recs = buffers.read(t, narrow=True)  # type: ignore[arg-type]
    return dict(zip(keys.tolist(), recs["state"].tolist()))


def test_an_unchanged_table_is_walked_once() -> None:
    t = Table(10)
    b = reads.SockBuffers(keep_walk=True)
    first = states(b, t)
    again = [states(b, t) for _ in range(3)]
    counts, total = reads.count_socks(t, b, chunk=3)  # type: ignore[arg-type]
    assert t.walks == 1 and b.walks == 1 and b.walks_skipped == 4
    assert all(a == first for a in again) and first == {k: 1 for k in range(1, 11)}
    assert total == 10 and int(counts[1]) == 10


def test_a_first_walk_of_a_table_seeded_past_the_bound_is_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeding says how big the table starts: past WALK_KEEP_MAX, the first
    walk copies nothing (it would be dropped), and the next is kept once a
    walk fits.  Seeded within the bound, the first walk is kept as ever."""
    monkeypatch.setattr(reads, "WALK_KEEP_MAX", 8)
    t = Table(6)  # shrunk since seeding, say
    t.seeded_records = 20  # type: ignore[attr-defined]
    b = reads.SockBuffers(keep_walk=True)
    assert states(b, t) == {k: 1 for k in range(1, 7)} and b._kept is None
    assert states(b, t) == {k: 1 for k in range(1, 7)} and b._kept is not None  # the last walk fitted
    assert states(b, t) == {k: 1 for k in range(1, 7)} and (t.walks, b.walks_skipped) == (2, 1)
    small = Table(6)
    small.seeded_records = 6  # type: ignore[attr-defined]
    b2 = reads.SockBuffers(keep_walk=True)
    states(b2, small)
    assert b2._kept is not None


def test_each_kernel_write_makes_the_next_read_walk() -> None:
    t = Table(10)
    b = reads.SockBuffers(keep_walk=True)
    states(b, t)
    t.write(3, 8)  # a record living in "socks" changed state
    assert states(b, t)[3] == 8 and t.walks == 2
    t.write(4, None)  # deleted
    assert 4 not in states(b, t) and t.walks == 3
    t.write(99, 1)  # moved out of the nursery
    assert states(b, t)[99] == 1 and t.walks == 4
    states(b, t)
    assert t.walks == 4


def test_a_write_of_this_process_makes_the_next_read_walk() -> None:
    t = Table(4)
    b = reads.SockBuffers(keep_walk=True)
    states(b, t)
    t.rows[2] = t.record(5)  # what writer.reap() or seeding does to the map itself
    writer.socks_written(t)
    assert states(b, t)[2] == 5 and t.walks == 2


def test_without_a_generation_or_without_keeping_every_read_walks() -> None:
    t = Table(4)
    t.counting = False
    b = reads.SockBuffers(keep_walk=True)
    states(b, t)
    states(b, t)
    assert t.walks == 2 and b.walks_skipped == 0
    t.counting = True
    plain = reads.SockBuffers()
    states(plain, t)
    states(plain, t)
    assert t.walks == 4


def test_a_table_larger_than_the_bound_is_not_kept(monkeypatch) -> None:
    monkeypatch.setattr(reads, "WALK_KEEP_MAX", 6)
    t = Table(7)
    b = reads.SockBuffers(keep_walk=True)
    assert len(states(b, t)) == 7
    assert len(states(b, t)) == 7 and t.walks == 2
    t.write(7, None)  # now 6 fit: kept from the walk after one that fitted
    assert len(states(b, t)) == 6 and t.walks == 3
    assert len(states(b, t)) == 6 and t.walks == 4
    assert len(states(b, t)) == 6 and t.walks == 4


def test_a_walk_read_in_part_is_not_kept() -> None:
    t = Table(20)
    b = reads.SockBuffers(keep_walk=True)
    chunks = b.chunks(t, chunk=4)  # type: ignore[arg-type]
    next(chunks)
    chunks.close()  # a reader that stopped early
    assert b.walks_skipped == 0 and len(states(b, t)) == 20
    assert t.walks == 2


def test_kept_rows_cannot_be_changed_by_a_reader() -> None:
    t = Table(3)
    b = reads.SockBuffers(keep_walk=True)
    states(b, t)
    keys, recs = next(b.chunks(t))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        recs["state"][0] = 9
    assert b.walks_skipped == 1 and states(b, t) == {1: 1, 2: 1, 3: 1}
