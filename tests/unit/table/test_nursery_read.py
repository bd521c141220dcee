"""The nursery read in place, as a BPF program changes slots under it."""

from __future__ import annotations

import numpy as np

from pytracer.table import poll


class ChangingView:
    """A nursery whose keys read differently at each access, as when the
    kernel frees or retakes slots between the reader's loads."""

    def __init__(self, keys_at_each_read: list[list[int]]) -> None:
        self._keys = [np.array(k, np.uint64) for k in keys_at_each_read]
        self._reads = 0
        n = len(keys_at_each_read[0])
        self._rec = np.zeros(n, poll.SLOT_DTYPE["rec"])
        self._rec["state"] = np.arange(1, n + 1)

    def __getitem__(self, field: str) -> np.ndarray:
        if field == "rec":
            return self._rec
        keys = self._keys[min(self._reads, len(self._keys) - 1)]
        self._reads += 1
        return keys


def read(view: ChangingView) -> tuple[list[int], list[int]]:
    buffers = poll.SockBuffers()
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
