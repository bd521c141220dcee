"""The nursery read in place, as a BPF program changes slots under it."""

from __future__ import annotations

import numpy as np
import pytest

from pytracer.table import poll, reads


class ChangingView:
    """A nursery whose keys read differently at each access, as when the
    kernel frees or retakes slots between the reader's loads."""

    def __init__(self, keys_at_each_read: list[list[int]]) -> None:
        self._keys = [np.array(k, np.uint64) for k in keys_at_each_read]
        self._reads = 0
        n = len(keys_at_each_read[0])
        self._rec = np.zeros(n, reads.SLOT_DTYPE["rec"])
        self._rec["state"] = np.arange(1, n + 1)

    def __getitem__(self, field: str) -> np.ndarray:
        if field == "rec":
            return self._rec
        keys = self._keys[min(self._reads, len(self._keys) - 1)]
        self._reads += 1
        return keys


def read(view: ChangingView) -> tuple[list[int], list[int]]:
    buffers = reads.SockBuffers()
    buffers._nursery_view = lambda m, slots: view  # type: ignore[method-assign]
    keys, recs = buffers.nursery_records(None, 4)
    return keys.tolist(), recs["state"].tolist()


def test_occupied_slots_are_read_with_their_records() -> None:
    assert read(ChangingView([[0, 7, 0, 9]])) == ([7, 9], [2, 4])


def test_a_slot_freed_before_its_key_is_copied_is_left_out() -> None:
    # Slot 1 is occupied when the reader looks for keys, free when it copies
    # them, and still free when it checks: not a record with key 0.
    assert read(ChangingView([[0, 7, 0, 9], [0, 0, 0, 9]])) == ([9], [4])


def test_a_slot_retaken_while_its_record_is_copied_is_left_out() -> None:
    assert read(ChangingView([[0, 7, 0, 9], [0, 7, 0, 9], [0, 8, 0, 9]])) == ([9], [4])


# --- a record that moves from the nursery to "socks" during a read ---------------


class Storm:
    """The nursery (4 slots) and "socks" of a table under a connection storm:
    walking "socks" moves the record of cookie 7 out of its slot (a newer
    socket, cookie 11, takes it) into "socks", in a bucket the walk has
    already passed (``seen`` False) or not yet (True)."""

    nursery_slots = 4

    def __init__(self, seen: bool) -> None:
        self.seen = seen
        self.view = np.zeros(4, reads.SLOT_DTYPE)
        for key in (7, 9):
            self.view[key % 4]["key"] = key
            self.view[key % 4]["rec"]["state"] = 1  # ESTABLISHED
            self.view[key % 4]["rec"]["counted"] = 1
        self.socks = {5: self.record(1)}
        self.max_entries = 16

    @staticmethod
    def record(state: int) -> np.ndarray:
        rec = np.zeros(1, reads.SOCK_DTYPE)
        rec["state"] = state
        rec["counted"] = 1
        return rec

    def map(self, name: str) -> Storm:
        return self

    def _walk(self) -> list[tuple[int, np.ndarray]]:
        before = list(self.socks.items())
        self.socks[7] = self.view[7 % 4]["rec"].copy().reshape(1)
        self.view[7 % 4]["key"] = 11
        self.view[7 % 4]["rec"]["state"] = 2  # SYN_SENT: just born
        return list(self.socks.items()) if self.seen else before

    def batches(self, value_size: int, chunk: int):
        rows = self._walk()
        keys = np.array([k for k, _ in rows], np.uint64)
        vals = np.concatenate([v for _, v in rows])
        yield memoryview(keys.tobytes()), memoryview(vals.tobytes()), len(rows)

    def dump_into(self, keys: np.ndarray, socks: np.ndarray, value_size: int) -> tuple[bool, int]:
        rows = self._walk()
        for i, (k, v) in enumerate(rows):
            keys[i] = k
            socks[i] = v[0]
        return True, len(rows)


def storm_buffers(storm: Storm) -> reads.SockBuffers:
    buffers = reads.SockBuffers()
    buffers._nursery_view = lambda m, slots: storm.view  # type: ignore[method-assign]
    return buffers


@pytest.mark.parametrize("seen", [False, True], ids=["walk-passed-its-bucket", "walk-meets-it"])
def test_a_record_moving_out_of_the_nursery_during_a_count_is_counted_once(seen: bool) -> None:
    storm = Storm(seen)
    states, total = reads.count_socks(storm, storm_buffers(storm))  # type: ignore[arg-type]
    # Cookies 5, 7 and 9, all ESTABLISHED (11 was born after the read began).
    assert total == 3 and int(states[1]) == 3, states


@pytest.mark.parametrize("narrow", [False, True], ids=["whole", "narrow"])
@pytest.mark.parametrize("seen", [False, True], ids=["walk-passed-its-bucket", "walk-meets-it"])
def test_a_record_moving_out_of_the_nursery_during_a_read_is_read_once(seen: bool, narrow: bool) -> None:
    storm = Storm(seen)
    keys, _ = storm_buffers(storm).read(storm, narrow=narrow)  # type: ignore[arg-type]
    assert sorted(keys.tolist()) == [5, 7, 9]


def test_nursery_membership_is_by_slot() -> None:
    slotted = reads.by_slot(np.array([100, 141, 202], np.uint64), 4)
    assert slotted.tolist() == [100, 141, 202, 0]
    keys = np.array([1, 96, 100, 104, 141, 145, 202, 10**18], np.uint64)
    assert reads.in_nursery(slotted, keys).tolist() == [False, False, True, False, True, False, True, False]
    assert reads.in_nursery(slotted, np.zeros(0, np.uint64)).tolist() == []


@pytest.mark.parametrize("seen", [False, True], ids=["walk-passed-its-bucket", "walk-meets-it"])
def test_a_reducer_is_given_each_record_once_at_its_row(seen: bool) -> None:
    """A narrow read hands each chunk of whole records to its reducer with
    the row they are kept at: each socket once, as the kept keys say."""
    storm = Storm(seen)
    seen_rows: dict[int, int] = {}

    class Rows:
        def start(self) -> None:
            seen_rows.clear()

        def add(self, first: int, keys: np.ndarray, recs: np.ndarray) -> None:
            for j, k in enumerate(keys.tolist()):
                assert k not in seen_rows
                seen_rows[k] = first + j

        def finish(self, mono: int) -> None:
            return None

    keys, _ = storm_buffers(storm).read(storm, narrow=True, reducer=Rows())  # type: ignore[arg-type]
    assert seen_rows == {int(k): i for i, k in enumerate(keys.tolist())} and len(seen_rows) == 3


class Table:
    """A "socks" map without a nursery: lookups and a walk in chunks."""

    nursery_slots = 0
    max_entries = 64

    def __init__(self, n: int) -> None:
        self.recs = {}
        for k in range(1, n + 1):
            rec = np.zeros(1, reads.SOCK_DTYPE)
            rec["lport"] = k
            self.recs[k * 10] = rec
        self.lookups = 0

    def map(self, name: str) -> Table:
        return self

    def lookup(self, key: bytes, size: int) -> bytes | None:
        self.lookups += 1
        rec = self.recs.get(int.from_bytes(key, "little"))
        return None if rec is None else rec.tobytes()

    def batches(self, value_size: int, chunk: int):
        items = list(self.recs.items())
        for at in range(0, len(items), 3):
            part = items[at : at + 3]
            keys = np.array([k for k, _ in part], np.uint64)
            yield memoryview(keys.tobytes()), memoryview(np.concatenate([v for _, v in part]).tobytes()), len(part)


@pytest.mark.parametrize("lookups", [True, False], ids=["by-lookup", "by-walk"])
def test_picked_records_are_the_current_ones_in_the_asked_order(lookups: bool, monkeypatch) -> None:
    table = Table(20)
    if not lookups:
        monkeypatch.setattr(reads, "PICK_LOOKUPS", 2)
    cookies = np.array([70, 5, 200, 10, 70, 999], np.uint64)  # 5 and 999: gone; 70 asked twice
    found, recs = reads.pick_records(table, cookies)  # type: ignore[arg-type]
    assert found.tolist() == [True, False, True, True, True, False]
    assert recs["lport"].tolist() == [7, 20, 1, 7] and recs.dtype == reads.PICK_DTYPE
    assert (table.lookups > 0) == lookups
    snap = poll.Snapshot(0, 0.0, None, cookies, np.zeros(6, reads.NARROW_DTYPE), 0.0,  # type: ignore[arg-type]
                         src=table)  # type: ignore[arg-type]
    idx, whole = snap.records_at(np.array([5, 3, 1]))
    assert idx.tolist() == [3] and whole["lport"].tolist() == [1]
