"""Who holds each socket: the fd scan, from BPF iterators or the /proc walk.

:mod:`pytracer.inventory.procs` reads /proc (including the walk of
/proc/PID/fd) and :mod:`pytracer.inventory.fdscan` runs the BPF task-file
iterators; neither knows the other's orchestration.  This module picks one
(:func:`scan_fds`) and answers the question both the seeding and the leak
scan ask of its result: which sockets are in scope for a --pid set
(:func:`scope_mask`).
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from pytracer.inventory import fdscan
from pytracer.inventory.procs import MAX_FDS_TOTAL, PROC, FdScan, SocketOwners, walk_fds
from pytracer.kernel.environment import effective_caps, fd_walk_note, say_once
from pytracer.kernel.tcp_states import TcpState

log = logging.getLogger(__name__)

__all__ = ["scan_fds", "scope_mask"]


def scan_fds(only: Iterable[int] | None = None, proc: str = PROC, max_fds: int = MAX_FDS_TOTAL) -> FdScan:
    """Every process's fds (or those of ``only``).

    Maps each socket inode to the (pid, fd) pairs holding it (a socket shared
    after fork() has several), counts open fds per process, notes each
    process's netns and any netns fds held open.  Stops after ``max_fds``
    fds and says so (``truncated``).

    On the real /proc this asks the kernel through BPF iterators
    (:mod:`pytracer.inventory.fdscan`) when they load, and walks /proc/PID/fd
    otherwise (:func:`pytracer.inventory.procs.walk_fds`; the reason is logged
    at debug level).  Same answers, same order and bound, with two
    differences: the kernel hands over every fd table (``unreadable`` is 0),
    and a netns fd opened through an ``ip netns`` bind mount, whose link is
    not ``net:[N]``, is found too.
    """
    if only is not None:
        only = list(only)  # read twice if the iterators fail
    if proc == PROC:
        try:
            return fdscan.shared().scan(only, proc, max_fds)
        except fdscan.FdScanUnavailable:
            pass  # logged once, when the load failed
        except OSError as exc:
            log.debug("socket owners: BPF iterator read failed (%s), walking /proc", exc)
    out = walk_fds(only, proc, max_fds)
    if out.unreadable and proc == PROC:
        say_once("fd-walk", fd_walk_note(effective_caps(), out.unreadable))
    return out


def scope_mask(rows: np.ndarray, owners: SocketOwners, pids: Iterable[int], ports: Iterable[int] = (),
               listen_rows: np.ndarray | None = None) -> np.ndarray:
    """Sockets in scope: all, or those ``pids`` hold an fd for, plus the
    unaccepted (and orphaned) sockets on the ports of their listeners; and,
    with ``ports``, only those with one of them at either end.
    ``listen_rows``: where the listeners are, when not among ``rows`` (a
    full scan's ESTABLISHED walk)."""
    wanted = set(pids)
    if ports:
        p = np.fromiter(set(ports), dtype=np.uint16)
        on_port = np.isin(rows["lport"], p) | np.isin(rows["rport"], p)
        return on_port & scope_mask(rows, owners, wanted, (), listen_rows) if wanted else on_port
    if not wanted:
        return np.ones(len(rows), dtype=bool)
    held = owners.held_by(wanted)
    mask = np.isin(rows["inode"].astype(np.uint64), held) & (rows["inode"] != 0)
    if listen_rows is None:
        lst = rows[mask & (rows["state"] == int(TcpState.LISTEN))]
    else:
        lst = listen_rows[(listen_rows["state"] == int(TcpState.LISTEN)) & (listen_rows["inode"] != 0)]
        lst = lst[np.isin(lst["inode"].astype(np.uint64), held)]
    if len(lst):
        key = rows["netns"].astype(np.uint64) * np.uint64(65536) + rows["lport"].astype(np.uint64)
        lkey = lst["netns"].astype(np.uint64) * np.uint64(65536) + lst["lport"].astype(np.uint64)
        mask |= (rows["inode"] == 0) & np.isin(key, lkey)
    return mask
