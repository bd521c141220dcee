"""repair(): seeded records whose socket changed state during seeding are
rewritten from a narrow re-dump (cookie and state only)."""

from __future__ import annotations

import sys

import numpy as np

from pytracer.arrays import fields_of
from pytracer.inventory import sockdiag
from pytracer.kernel import abi
from pytracer.table import writer
from pytracer.table.reads import SOCK_DTYPE


class FakeSocks:
    def __init__(self, recs: dict[int, np.ndarray]) -> None:
        self.recs = recs
        self.writes: list[tuple[int, np.ndarray, int]] = []

    def lookup(self, key: bytes, size: int) -> bytes | None:
        rec = self.recs.get(int.from_bytes(key, sys.byteorder))
        return None if rec is None else rec.tobytes()

    def update(self, key: bytes, value: bytes, flags: int) -> None:
        self.writes.append((int.from_bytes(key, sys.byteorder), np.frombuffer(value, SOCK_DTYPE)[0], flags))


def _seeded(state: int, transitions: int = 0) -> np.ndarray:
    rec = np.zeros(1, SOCK_DTYPE)[0]
    rec["state"], rec["transitions"] = state, transitions
    rec["flags"] = abi.PT_F_SEEDED | abi.PT_F_BIRTH_UNKNOWN
    return rec


def test_repair_rewrites_only_untouched_seeded_records_whose_state_moved() -> None:
    keys = np.array([10, 20, 30, 40], np.uint64)
    states = np.array([1, 1, 1, 1], np.uint8)
    ok = np.array([True, True, True, False])
    live = np.zeros(4, fields_of(sockdiag.INV_DTYPE, ("cookie", "state")))
    live["cookie"] = [40, 30, 20, 10]
    live["state"] = [8, 8, 8, 1]  # 10 unchanged; 20, 30, 40 moved to CLOSE_WAIT
    socks = FakeSocks({10: _seeded(1), 20: _seeded(1), 30: _seeded(1, transitions=2), 40: _seeded(1)})
    res = writer.SeedResult()
    writer.repair(socks, keys, states, ok, live, res)
    # 30's record has transitions since (the kernel's own); 40 was not inserted.
    assert [(k, int(r["state"]), f) for k, r, f in socks.writes] == [(20, 8, writer.BPF_EXIST)]
    assert res.repaired == 1
