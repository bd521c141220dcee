"""The reaper: table records whose socket no longer exists are deleted.

Run by a full leak scan (:class:`pytracer.leaks.scanner.Scanner`), the only
one that lists every socket; the write goes through
:mod:`pytracer.table.writer`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pytracer.arrays import among
from pytracer.kernel.tcp_states import TcpState
from pytracer.table import writer
from pytracer.table.poll import Snapshot
from pytracer.table.writer import SEED_STATES

log = logging.getLogger(__name__)

REAP_LOGGED = 5  # records described in the log per scan


class Reaper:
    """What the reaper remembers between full scans: records first missed,
    and how many it deleted."""

    def __init__(self, tracer: Any, reap_after: float) -> None:
        self.tracer = tracer
        self.reap_after = reap_after
        self.reaped = 0
        # Records whose socket the last scan could not find: key -> (state_ns,
        # transitions, monotonic seconds first missed).
        self._missing: dict[int, tuple[int, int, float]] = {}

    def reap(self, snap: Snapshot, listed: np.ndarray, covered: set[int], partial: bool, now: float,
             now_ns: int) -> None:
        """Delete table records whose socket no longer exists, and count them.
        ``listed``: the cookies (ascending) of every socket a full scan's
        dumps listed in the states the table holds.

        A record leaves the table when its socket reaches CLOSE; if that
        transition never reaches a program, the record would stay forever,
        hold a slot, and its lifetime would never be counted.  Such a record
        is reaped when its socket's cookie is missing from two complete
        sock_diag dumps at least ``reap_after`` apart, in a namespace both
        dumps covered, while the record did not change.  Cookies are never
        reused, and the states reaped are ones sock_diag always lists (not
        CLOSE: an unhashed socket still held by an fd is not listed).
        The count is ``records_reaped``; each is logged.
        """
        if partial or getattr(self.tracer, "key_by_ptr", False) or not len(snap.keys):
            self._missing = {}
            return
        socks = snap.socks
        netns = np.fromiter((ino & 0xFFFFFFFF for ino in covered), np.uint32, len(covered))
        absent = np.isin(socks["state"], [int(st) for st in SEED_STATES])
        absent &= np.isin(socks["netns_ino"], netns)
        absent &= socks["state_ns"].astype(np.int64) < np.int64(now_ns - int(self.reap_after * 1e9))
        at = np.flatnonzero(absent)
        absent[at[among(snap.keys[at], listed)]] = False
        missing: dict[int, tuple[int, int, float]] = {}
        due = []
        for i in np.flatnonzero(absent).tolist():
            key = int(snap.keys[i])
            mark = (int(socks["state_ns"][i]), int(socks["transitions"][i]))
            first = self._missing.get(key)
            if first is not None and first[:2] == mark and now - first[2] >= self.reap_after:
                due.append(i)
            else:
                missing[key] = first if first is not None and first[:2] == mark else (*mark, now)
        self._missing = missing
        if not due:
            return
        logged = 0
        for i in due:
            rec = writer.reap(self.tracer, int(snap.keys[i]), int(socks["state_ns"][i]), int(socks["transitions"][i]))
            if rec is None:
                continue  # ended meanwhile (the kernel counted it), changed, or gone
            self.reaped += 1
            if logged < REAP_LOGGED:
                logged += 1
                log.warning("reaped a table record whose socket is gone (no transition to CLOSE seen): cookie %d, %s, "
                            "port %d -> %d, netns %d, last change %.1f s ago", int(snap.keys[i]),
                            TcpState.name_of(int(rec["state"])), int(rec["lport"]), int(rec["rport"]),
                            int(rec["netns_ino"]), (now_ns - int(rec["state_ns"])) / 1e9)
