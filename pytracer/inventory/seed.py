"""Seeding: put every pre-existing TCP socket into the kernel's table at start.

The table (and ``tracer watch``) then shows sockets older than the tracer,
marked "birth unknown".  This module gathers what to seed, from sock_diag
(every socket, in every namespace the fd scan names) and the fd owners
(:mod:`pytracer.inventory.owners`, /proc for comm and cgroup); the writes,
and the care not to clobber records the kernel made meanwhile, are
:mod:`pytracer.table.writer`'s.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np

from pytracer.inventory import procs, sockdiag
from pytracer.inventory.owners import scan_fds, scope_mask
from pytracer.inventory.session import Session
from pytracer.kernel.environment import give_back_heap
from pytracer.kernel.tcp_states import TcpState
from pytracer.table import writer
from pytracer.table.writer import SEED_STATES, SeedResult

__all__ = ["SeedResult", "seed"]

log = logging.getLogger(__name__)


class Owners:
    """Owner pid, fd, comm and cgroup id of inventory rows, from the fd scan.
    /proc is read once per owning process, however many chunks ask."""

    def __init__(self, rows: np.ndarray, owners: procs.SocketOwners, proc: str) -> None:
        pid, fd = owners.first(rows["inode"].astype(np.uint64))
        self.pid, self.fd = pid.astype(np.uint32), fd.astype(np.int32)
        self.proc = proc
        self._facts: dict[int, tuple[bytes, int]] = {}

    @property
    def found(self) -> int:
        return int(np.count_nonzero(self.pid))

    def fill(self, recs: np.ndarray, idx: np.ndarray) -> None:
        """The owner columns of ``recs``, the records of rows ``idx``."""
        pid = self.pid[idx]
        recs["owner_tgid"] = pid
        recs["owner_fd"] = self.fd[idx]
        has = pid != 0
        if not has.any():
            return
        uniq, inverse = np.unique(pid[has], return_inverse=True)
        comms = np.zeros(len(uniq), np.dtype("S16"))
        cgids = np.zeros(len(uniq), np.uint64)
        for j, p in enumerate(uniq.tolist()):
            if p not in self._facts:
                self._facts[p] = ((procs.comm(p, self.proc) or "").encode()[:15],
                                  procs.cgroup_id(procs.cgroup_raw(p, self.proc)))
            comms[j], cgids[j] = self._facts[p]
        recs["owner_comm"][has] = comms[inverse].view(np.dtype("S1")).reshape(-1, 16)
        recs["cgroup_id"][has] = cgids[inverse]


def seed(tracer: Any, pids: Iterable[int] | None = None, proc: str = procs.PROC) -> SeedResult:
    """Insert every existing TCP socket into the kernel table (see module doc).

    Records get ``PT_F_SEEDED | PT_F_BIRTH_UNKNOWN``, birth 0, ``counted`` 0
    (they stay out of the histograms: their lifetimes are unknown), the state
    sock_diag reports, ``state_ns`` the time of the dump (so "time in state"
    reads "at least"), the owner found in /proc, and the inode.  A record
    the kernel created meanwhile wins (see :func:`pytracer.table.writer.insert_new`).

    The records are built and written a chunk at a time
    (:data:`pytracer.table.writer.SEED_CHUNK`, one BPF_MAP_UPDATE_BATCH
    each), so seeding never holds every socket's whole record; each element
    that fails (table full) is counted and the batch carries on after it.
    """
    res = SeedResult()
    t0 = time.perf_counter()
    # Keyed by pointer, records can't be named from sock_diag; listeners can
    # (by netns, port and family), and their owners let --pid keep the
    # children accepted from now on.
    by_ptr = bool(getattr(tracer, "key_by_ptr", False))
    if by_ptr:
        res.skipped = ("this kernel keys socket records by pointer (no socket cookie in tracing programs), "
                       "which sock_diag cannot name; sockets older than the tracer are still found by "
                       "`tracer leaks` through sock_diag")
    pids = tuple(sorted(set(pids if pids is not None else getattr(tracer, "pids", ()) or ())))
    states = sum(1 << int(s) for s in SEED_STATES)
    try:
        fds = scan_fds(pids or None, proc)
        refs = procs.netns_refs(fds, proc)
        if pids:
            wanted = {fds.netns_of[p] for p in pids if p in fds.netns_of}
            refs = [r for r in refs if r.label == "host" or r.ino in wanted]
        with Session(refs) as sess:
            inv = sess.dump(states=states)
            seen_ns = time.monotonic_ns()  # after the dump: a valid "at least" origin
            res.errors.extend(inv.errors)
            rows = inv.rows
            del inv
            mask = np.isin(rows["state"], [int(s) for s in SEED_STATES]) & (rows["timer"] != sockdiag.TIMER_TIMEWAIT)
            mask &= scope_mask(rows, fds.sockets, pids)
            if by_ptr:
                mask &= rows["state"] == int(TcpState.LISTEN)
            if not mask.all():
                rows = rows[mask]
            del mask
            owners = Owners(rows, fds.sockets, proc)
            res.with_owner = owners.found
            del fds
            if by_ptr:
                res.listeners = writer.seed_listeners(tracer, rows, owners.pid, res)
                res.seconds = round(time.perf_counter() - t0, 6)
                return res

            def records(idx: np.ndarray) -> np.ndarray:
                recs = writer.seed_records(rows[idx], seen_ns)
                owners.fill(recs, idx)
                return recs

            writer.write_seeded(tracer, sess, states, rows, records, owners.pid, res)
            # How big the table starts: its readers size their first walk by it (pytracer.table.reads).
            tracer.seeded_records = res.seeded
    except Exception as exc:  # seeding is best effort: the scan finds these sockets anyway
        log.warning("seeding pre-existing sockets failed: %s", exc)
        res.errors.append(f"seeding: {type(exc).__name__}: {exc}")
    give_back_heap()  # the first full scan follows: not on the heap seeding fragmented
    res.seconds = round(time.perf_counter() - t0, 6)
    return res
