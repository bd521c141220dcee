"""pytracer.table.services.read against a recorded map source: decoding, and
the cache that keeps unchanged slots' objects between reads."""

from __future__ import annotations

import struct

import numpy as np

from pytracer.kernel import abi
from pytracer.table import services

SIZE = abi.percpu_stride(services._SVC_SIZE)


class Maps:
    """Two CPUs, one named slot (port 8080, server) besides "other"."""

    ncpus = 2

    def __init__(self) -> None:
        self.values: dict[int, bytearray] = {0: bytearray(SIZE * 2), 1: bytearray(SIZE * 2)}
        self.lookups = 0

    def map(self, name: str):  # noqa: ANN201 - a duck-typed map
        return self if name == "svc" else Ports()

    def lookup(self, key: bytes, size: int) -> bytes | None:
        self.lookups += 1
        raw = self.values.get(struct.unpack("=I", key)[0])
        return None if raw is None else bytes(raw[:size])

    def end(self, slot: int, cpu: int) -> None:
        """One more end on slot, counted on cpu (the first word of pt_svc)."""
        words = np.frombuffer(self.values[slot], np.uint64)
        words[cpu * SIZE // 8] += 1


class Ports:
    def dump(self, _vsize: int) -> tuple[bytes, bytes, int]:
        return struct.pack("=HBB", 8080, int(abi.Role.SERVER), 0), struct.pack("=I", 1), 1


def test_unchanged_slots_keep_their_objects() -> None:
    src, cache = Maps(), {}
    src.end(1, 0)
    src.end(1, 1)
    first = services.read(src, cache)
    assert [(s.service, s.role, s.ends) for s in first] == [("other", "", 0), ("8080", "server", 2)]
    again = services.read(src, cache)
    assert all(a is b for a, b in zip(first, again)) and len(again) == 2
    src.end(1, 1)  # one more end: that slot is decoded afresh, the other is not
    third = services.read(src, cache)
    assert third[0] is first[0] and third[1] is not first[1] and third[1].ends == 3
    # Without a cache every read decodes.
    assert services.read(src)[1] is not services.read(src)[1]
