"""``tracer run``'s library side: watch one command's process tree, keep
every flag raised, and judge the run.

The tree itself is followed in the kernel (the "follow" hook: a forked
child joins the "owners" pid filter, an exited process leaves it), so what
:class:`Gate` reads each tick is the filter's current members
(:func:`pytracer.table.tree.read_tree`).  Each tick scans for leaks among
them through the same incremental :class:`~pytracer.leaks.scanner.Scanner`
and duty cycle as ``tracer watch``; flags are collected by identity, so a
socket flagged at every tick is one flag whose age grows.

When the command has exited, :meth:`Gate.finish` reads the kernel's totals
(opened, closed, lifetimes: only the tree's sockets were recorded), and
names the sockets the processes still in the tree (descendants that
outlived the command) hold.  :func:`verdict` is pure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pytracer.format import address, family_name
from pytracer.inventory import procs, sockdiag
from pytracer.inventory.owners import scan_fds
from pytracer.inventory.session import Session
from pytracer.kernel.abi import Direction, Stat
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.cadence import DutyCycle
from pytracer.leaks.detectors import KINDS, Flag
from pytracer.leaks.scanner import Scanner
from pytracer.leaks.thresholds import Thresholds
from pytracer.table import poll, reads
from pytracer.table.tree import Tree, read_tree

__all__ = ["DEFAULT_FAIL_ON", "Gate", "RunResult", "parse_kinds", "verdict"]

DEFAULT_FAIL_ON = ("close_wait", "close_wait_growth", "fd_exhaustion")
CONNECTIONS = (Direction.ACTIVE, Direction.PASSIVE)
MAX_FLAGS = 10000  # distinct flags kept per run; more are counted, not stored
MAX_HELD = 1000  # sockets listed for the processes that outlived the command


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--fail-on``: comma-separated flag kinds, "all", or "none" (or empty)."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if words in ([], ["none"]):
        return ()
    if words == ["all"]:
        return KINDS
    unknown = [w for w in words if w not in KINDS]
    if unknown:
        raise ValueError(f"unknown flag kind {', '.join(unknown)}: use {', '.join(KINDS)}, all or none")
    return tuple(dict.fromkeys(words))


def verdict(command_code: int, flagged: Iterable[str], fail_on: Iterable[str]) -> int:
    """The exit code of a run: the command's own if it failed, else 1 when a
    ``fail_on`` kind was flagged, else 0."""
    if command_code != 0:
        return command_code
    return 1 if set(flagged) & set(fail_on) else 0


def flag_identity(f: Flag) -> tuple:
    """What makes two scans' flags the same finding."""
    # Not the cookie or inode: one scan kind may lack what another fills in.
    return (f.kind, f.pid, f.fd, f.laddr, f.lport, f.raddr, f.rport)


@dataclass
class RunResult:
    """Everything a run found (pytracer.views.run renders it: text, the
    ``--report`` JSON, the ``--junit`` XML)."""

    argv: list[str]
    user: str
    exit_code: int  # the command's (128 + signal if killed)
    verdict: int
    fail_on: tuple[str, ...]
    seconds: float
    flags: list[Flag]
    flags_dropped: int
    tree: Tree
    opened: dict[str, int]
    closed: dict[str, int]
    totals: poll.Totals  # the kernel's aggregates: only the tree's sockets were recorded
    outlived: list[dict[str, Any]]  # processes still in the tree, with the sockets they hold
    thresholds: Thresholds
    lost: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return sorted({f.kind for f in self.flags})

    @property
    def failed_kinds(self) -> list[str]:
        return [k for k in self.kinds if k in self.fail_on]


class Gate:
    """One run's watch over its tree.  ``tracer`` is loaded with
    ``follow_forks`` and the held command's pid in its filter."""

    def __init__(self, tracer: Any, thresholds: Thresholds, duty: float = 0.25) -> None:
        self.tracer = tracer
        self.thresholds = thresholds
        self.start = time.monotonic()
        self.buffers = reads.SockBuffers(keep_walk=True)
        self.cycle = DutyCycle(Scanner(tracer, thresholds, pids=tracer.pids, incremental=True), duty)
        self.flags: dict[tuple, Flag] = {}
        self.dropped = 0
        self.errors: list[str] = []

    def warm(self) -> None:
        """One full scan before the command runs (it holds nothing yet): the
        fd iterators load and the scanner's first, full scan is behind us,
        so the scans while the command runs are the cheap candidate scans,
        every tick, instead of the duty cycle waiting out a slow first one."""
        self.cycle.scanner.scan(poll.snapshot(self.tracer, buffers=self.buffers, narrow=True))

    def tick(self) -> list[Flag]:
        """Scan the tree's processes (held to the duty cycle); the flags not seen before."""
        tree = read_tree(self.tracer)
        if not tree.pids:
            return []  # nobody left to hold a socket (and no pids would mean the whole host)
        self.cycle.scanner.pids = tree.pids
        snap = poll.snapshot(self.tracer, buffers=self.buffers, narrow=True)
        lr, fresh = self.cycle.scan(snap)
        if not fresh:
            return []
        for e in lr.errors:
            if e not in self.errors and len(self.errors) < 20:
                self.errors.append(e)
        return self.record(lr.flags)

    def record(self, flags: Iterable[Flag]) -> list[Flag]:
        new = []
        for f in flags:
            key = flag_identity(f)
            if key in self.flags:
                self.flags[key] = f  # the latest sighting: its age has grown
            elif len(self.flags) < MAX_FLAGS:
                self.flags[key] = f
                new.append(f)
            else:
                self.dropped += 1
        return new

    def finish(self, argv: list[str], user: str, exit_code: int, fail_on: tuple[str, ...]) -> RunResult:
        """After the command exited: totals, and what the survivors hold."""
        tree = read_tree(self.tracer)
        totals = poll.read_totals(self.tracer)
        flags = list(self.flags.values())
        if tree.pids:
            flags += self.tick_final(tree)
        opened = {d.name.lower(): totals.stat(Stat.OPENED, int(d)) for d in CONNECTIONS}
        closed = {d.name.lower(): totals.stat(Stat.CLOSED, int(d)) for d in CONNECTIONS}
        lost = {"insert_failed": totals.stat(Stat.INSERT_FAILED), "not_followed_filter_full": tree.full}
        kinds = {f.kind for f in flags}
        return RunResult(
            argv=argv, user=user, exit_code=exit_code, verdict=verdict(exit_code, kinds, fail_on), fail_on=fail_on,
            seconds=time.monotonic() - self.start, flags=flags, flags_dropped=self.dropped, tree=tree,
            opened=opened, closed=closed, totals=totals, outlived=self.outlived(tree.pids),
            thresholds=self.thresholds, lost=lost, errors=self.errors,
        )

    def tick_final(self, tree: Tree) -> list[Flag]:
        """One last scan of the survivors, whatever the duty cycle says."""
        sc = self.cycle.scanner
        sc.pids = tree.pids
        lr = sc.scan(poll.snapshot(self.tracer, buffers=self.buffers, narrow=True))
        return self.record(lr.flags)

    def outlived(self, pids: tuple[int, ...]) -> list[dict[str, Any]]:
        """Each process still in the tree, with the TCP sockets it holds."""
        if not pids:
            return []
        try:
            held = held_sockets(pids)
        except OSError as exc:
            self.errors.append(f"sockets of the processes left: {exc}")
            held = {}
        out = []
        for pid in pids:
            comm = procs.comm(pid)
            if comm is None:
                continue  # exited meanwhile
            out.append({"pid": pid, "comm": comm, "cmdline": (procs.cmdline(pid) or "")[:500],
                        "sockets": held.get(pid, [])})
        return out


def held_sockets(pids: tuple[int, ...]) -> dict[int, list[dict[str, Any]]]:
    """pid -> the TCP sockets it holds an fd for (sock_diag and the fd scan)."""
    fds = scan_fds(pids)
    refs = procs.netns_refs(fds)
    wanted = {fds.netns_of[p] for p in pids if p in fds.netns_of}
    refs = [r for r in refs if r.label == "host" or r.ino in wanted]
    out: dict[int, list[dict[str, Any]]] = {}
    with Session(refs) as sess:
        rows = sess.dump(states=sockdiag.ALL_STATES).rows
    rows = rows[rows["inode"] != 0]
    n = 0
    for i in np.flatnonzero(np.isin(rows["inode"].astype(np.uint64), fds.sockets.held_by(set(pids)))).tolist():
        r = rows[i]
        fam = int(r["family"])
        for pid, fd in fds.sockets.get(int(r["inode"]), []):
            if pid not in pids or n >= MAX_HELD:
                continue
            n += 1
            out.setdefault(pid, []).append({
                "fd": fd, "state": TcpState.name_of(int(r["state"])), "family": family_name(fam),
                "laddr": address(fam, bytes(r["laddr"])), "lport": int(r["lport"]),
                "raddr": address(fam, bytes(r["raddr"])), "rport": int(r["rport"]), "inode": int(r["inode"]),
            })
    return out
