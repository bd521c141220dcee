"""Read the per-service aggregates: lifetime and idle-before-end histograms.

The kernel's "svc" per-CPU array has one struct pt_svc per slot (slot 0:
``other``); "svc_ports" names the rest (port and role).  One lookup per
slot, summed over CPUs with numpy; no per-connection work.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pytracer.kernel import abi
from pytracer.kernel.histogram import Histogram

ENDER_NAMES = {
    abi.Ender.LOCAL: "local_close",
    abi.Ender.PEER: "peer_fin",
    abi.Ender.RESET: "reset_received",
    abi.Ender.ABORT: "local_abort",
    abi.Ender.TIMEOUT: "timeout",
}
ENDERS = tuple(ENDER_NAMES.values())
ROLE_NAMES = {int(abi.Role.SERVER): "server", int(abi.Role.CLIENT): "client"}
OTHER = "other"

_SVC_SIZE = ctypes.sizeof(abi.PtSvc)
_HIST_WORDS = abi.PT_HIST_SLOTS + 1
_OWNER_OFF = abi.PtSvc.owner.offset // 4
_LIFE_OFF = abi.PtSvc.lifetime.offset // 8
_IDLE_OFF = abi.PtSvc.idle.offset // 8


@dataclass
class ServiceStats:
    """One service's aggregates since load.  Every count only goes up."""

    service: str  # the port, or "other"
    role: str  # "server", "client", or "" for other
    ends: int = 0
    no_idle: int = 0  # ended without ever carrying data
    lifetime: Histogram = field(default_factory=Histogram.empty)
    idle: dict[str, Histogram] = field(default_factory=dict)  # by ender name
    owners: dict[str, int] = field(default_factory=dict)  # ender -> tgid of the last one ended

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.role)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": self.service, "role": self.role, "ends": self.ends,
                               "no_idle": self.no_idle}
        out["lifetime_p50_s"] = _r(self.lifetime.quantile(0.5))
        out["lifetime_p95_s"] = _r(self.lifetime.quantile(0.95))
        out["idle_before_end"] = {
            e: {"count": h.count, "p50_s": _r(h.quantile(0.5)), "p95_s": _r(h.quantile(0.95))}
            for e, h in self.idle.items() if h.count
        }
        return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def _hist(words: np.ndarray, off: int) -> Histogram:
    row = words[off : off + _HIST_WORDS]
    return Histogram(tuple(int(x) for x in row[: abi.PT_HIST_SLOTS]), int(row[abi.PT_HIST_SLOTS]))


def decode(raw: bytes, ncpus: int, service: str, role: str) -> ServiceStats:
    """One slot's per-CPU values, summed."""
    stride = abi.percpu_stride(_SVC_SIZE)
    words = np.frombuffer(raw, dtype=np.uint64, count=stride // 8 * ncpus).reshape(ncpus, stride // 8)
    total = words[:, : _SVC_SIZE // 8].sum(axis=0, dtype=np.uint64)
    owners32 = np.frombuffer(raw, dtype=np.uint32, count=stride // 4 * ncpus).reshape(ncpus, stride // 4)
    owners = owners32[:, _OWNER_OFF : _OWNER_OFF + abi.PT_ENDERS].max(axis=0)
    idle = {name: _hist(total, _IDLE_OFF + int(e) * _HIST_WORDS) for e, name in ENDER_NAMES.items()}
    return ServiceStats(
        service=service, role=role, ends=int(total[0]), no_idle=int(total[1]),
        lifetime=_hist(total, _LIFE_OFF), idle=idle,
        owners={name: int(owners[int(e)]) for e, name in ENDER_NAMES.items() if owners[int(e)]},
    )


def names(src: Any) -> dict[int, tuple[str, str]]:
    """slot -> (service, role), from the "svc_ports" map."""
    keys, vals, n = src.map("svc_ports").dump(4)
    ksz = ctypes.sizeof(abi.PtSvcKey)
    out: dict[int, tuple[str, str]] = {}
    for i in range(n):
        port, role, _pad = struct.unpack_from("=HBB", keys, i * ksz)
        (slot,) = struct.unpack_from("=I", vals, i * 4)
        out[slot] = (str(port), ROLE_NAMES.get(role, str(role)))
    return out


def read(src: Any, cache: dict[int, tuple[Any, ServiceStats]] | None = None) -> list[ServiceStats]:
    """Every named service and ``other``; a slot that has never ended a
    connection is still listed when it is named (a zero is a fact).

    ``cache`` (the caller's, kept between reads): a slot whose name and
    per-CPU values are unchanged since the last read returns the same
    ServiceStats object, not decoded again; callers must not modify it."""
    size = abi.percpu_stride(_SVC_SIZE) * src.ncpus
    m = src.map("svc")
    labels = names(src)
    out = []
    for slot in range(abi.PT_SVC_SLOTS):
        if slot and slot not in labels:
            continue
        # Each slot's runs nested in another of ours have an entry of their
        # own, PT_SVC_SLOTS further on (CO-RE; bcc has only the first).
        raws = [m.lookup(struct.pack("=I", slot + i * abi.PT_SVC_SLOTS), size) for i in range(abi.PT_AGG_ENTRIES)]
        present = [r for r in raws if r is not None]
        if not present:
            continue
        service, role = labels.get(slot, (OTHER, ""))
        raw = b"".join(present)
        hit = cache.get(slot) if cache is not None else None
        if hit is not None and hit[0] == (service, role, raw):
            out.append(hit[1])
            continue
        stats = decode(raw, src.ncpus * len(present), service, role)
        if cache is not None:
            cache[slot] = ((service, role, raw), stats)
        out.append(stats)
    return out


def by_ender(stats: list[ServiceStats]) -> dict[str, Histogram]:
    """Host-wide idle before end by ender: the sum over services."""
    out = {e: Histogram.empty() for e in ENDERS}
    for s in stats:
        for e, h in s.idle.items():
            out[e] = out[e] + h
    return out
