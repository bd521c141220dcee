"""Idle flags carried between their rechecks: a pile costs what changes.

An ESTABLISHED socket found idle for ``idle_after`` is measured again
(tcp_info) only ``Thresholds.idle_recheck_s`` later, not at every scan: a
host with 20,000 idle keep-alive connections would otherwise ask the
kernel about all of them every few seconds (a dump of every ESTABLISHED
socket with tcp_info) and build 20,000 flags anew each time.  In between,
:class:`IdleCarry` keeps each one's flag as it was measured, for as long as
the scans show nothing changed:

* the BPF table still holds its record in ESTABLISHED with the same
  ``state_ns`` (no transition since it was measured), or, for a socket the
  table does not hold, a full scan still lists it;
* a socket whose record is gone (closed) or moved on is dropped at once.

A carried flag's ``seconds`` and ``idle_seconds`` are those of its last
measure, at most ``idle_recheck_s`` old (60 s with the default
``idle_after`` of 300 s); a flagged socket that becomes busy stays flagged
until then.  While nothing changes, a scan returns the very same list, so
what is built from it (its JSON) is not built again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pytracer.arrays import among, find_sorted
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import Flag, ordered

_ESTABLISHED = int(TcpState.ESTABLISHED)


class IdleCarry:
    """The ``idle_established`` flags of earlier scans whose sockets have
    not been measured again since (see the module docstring)."""

    def __init__(self) -> None:
        self.flags: list[Flag] = []  # in the order detectors.ordered() gives them
        self.cookies = np.zeros(0, np.uint64)
        self.state_ns = np.zeros(0, np.int64)  # their table record's state_ns when measured; -1: not in the table
        self.carried = 0  # flags the last merge carried (not measured this scan)

    def __len__(self) -> int:
        return len(self.flags)

    def asked_among(self, listed: np.ndarray, asked: np.ndarray) -> np.ndarray:
        """The carried flags' cookies among ``listed[asked]`` (``listed``
        ascending, ``asked`` ascending row indices: a full scan's rows and
        the rows it asks tcp_info for), for :meth:`merge`: a full scan need
        not keep the cookies of every socket it asked (100k at its first
        scan) to drop the few carried ones."""
        if not len(self.cookies) or not len(asked):
            return np.zeros(0, np.uint64)
        row, listed_hit = find_sorted(listed, self.cookies)
        _, asked_hit = find_sorted(asked, row)
        return self.cookies[listed_hit & asked_hit]

    @staticmethod
    def idle(flags: list[Flag]) -> list[Flag]:
        return [f for f in flags if f.kind == "idle_established"]

    @staticmethod
    def others(flags: list[Flag]) -> list[Flag]:
        return [f for f in flags if f.kind != "idle_established"]

    def merge(self, judged: list[Flag], asked: np.ndarray, snap: Any, listed: np.ndarray | None = None,
              limit: int | None = None) -> list[Flag]:
        """The idle flags now: this scan's (``judged``) and the carried ones
        still valid, ordered; the same list as last time if nothing changed.

        ``asked``: cookies this scan measured (their answer replaces the
        carry's, flagged or not).  ``snap``: the table snapshot (keys,
        socks), or None.  ``listed``: every cookie a full scan listed (a
        carried socket not among them is gone); None for a candidate scan.
        ``limit``: at most this many, the longest idle first.
        """
        n = len(self.flags)
        keep = np.ones(n, bool)
        if n and len(asked):
            keep &= ~np.isin(self.cookies, asked)
        if n and listed is not None:
            keep &= among(self.cookies, listed)  # a full scan's rows: sorted by cookie
        if n and snap is not None and len(snap.keys):
            found, at = _positions(snap.keys, self.cookies)
            st = np.where(found, snap.socks["state"][at], 0)
            rec_ns = np.where(found, snap.socks["state_ns"][at].astype(np.int64), -1)
            # Held by the table when measured: still there, in ESTABLISHED, with no transition since.
            keep &= (self.state_ns < 0) | (found & (st == _ESTABLISHED) & (rec_ns == self.state_ns))
        elif n:
            keep &= self.state_ns < 0  # no table now: only what it never held
        if not judged and keep.all():
            self.carried = n
            return self.flags
        kept = [self.flags[i] for i in np.flatnonzero(keep).tolist()]
        if judged:
            new = {f.cookie for f in judged}
            kept = [f for f in kept if f.cookie not in new]
        self.carried = len(kept)
        out = ordered(kept + judged)
        if limit is not None and len(out) > limit:
            out = out[:limit]
        self._store(out, snap)
        return out

    def _store(self, flags: list[Flag], snap: Any) -> None:
        self.flags = flags
        self.cookies = np.fromiter((f.cookie or 0 for f in flags), np.uint64, len(flags))
        self.state_ns = np.full(len(flags), -1, np.int64)
        if snap is not None and len(flags) and len(snap.keys):
            found, at = _positions(snap.keys, self.cookies)
            self.state_ns = np.where(found, snap.socks["state_ns"][at].astype(np.int64), -1)


def _positions(keys: np.ndarray, cookies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, index into ``keys``) of each cookie; ``keys`` unsorted."""
    order = np.argsort(keys, kind="stable")
    pos, found = find_sorted(keys[order], cookies)
    return found, order[pos] if len(order) else pos
