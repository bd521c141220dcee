"""A full scan's ESTABLISHED sockets, judged a part at a time.

Most of a host with many live sockets is ESTABLISHED.  A full scan
(:meth:`pytracer.leaks.scanner.Scanner._full`) dumps the other states whole
(few, and TIME_WAIT kept narrow) and walks the ESTABLISHED ones on their
own, with INET_DIAG_INFO (:meth:`pytracer.inventory.session.Session.walk_info`):
their idle clocks come in the same messages, so the candidates need no
lookups and no second walk.  Each part of the walk (about a thousand
sockets, a dozen datagrams) is judged as it comes
(:meth:`Established.add`): the join with the socket table, the carried
history, which are candidates, their idle time, the idle ones' facts, the
counts.  So a full scan never holds every ESTABLISHED socket's row, table
answer, carried history or idle time at once: what it keeps of each is what
the history keeps between scans (cookie, state, three times) and the inode
(which names a socket's holder for the views), 25 bytes; the rest are
counts.

A walk (one namespace, one or both families) can fail partway, a netlink
error or an interrupted dump, after some of its parts were judged.
Each walk is judged into a :class:`Tally` of its own, added to the scan's
when the walk is read to its end: a failed walk leaves the scan as if it
had handed out nothing, as a failed dump keeps none of its rows.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pytracer.inventory import procs
from pytracer.inventory.owners import scope_mask
from pytracer.leaks import facts as joins
from pytracer.leaks.detectors import SockFacts, Thresholds
from pytracer.leaks.idle_carry import IdleCarry
from pytracer.table.poll import Snapshot

# What a full scan keeps of every socket for the history, the columns of
# History.store_parts, and the inode beside them.
KEPT_COLUMNS = ("cookie", "state", *joins.HISTORY_TIMES, "inode")


class Tally:
    """What judging ESTABLISHED parts adds up to: counts, the kept
    columns (a piece per part), the facts.  A full scan's
    :class:`Established` is the tally of the walks that ended well; each
    walk is judged into a tally of its own, added to it when the walk is
    read to its end and dropped when the walk fails
    (:meth:`Established.end_walk`).  Adding one moves its pieces, copying
    none, so the scan holds nothing more of a socket than before."""

    def __init__(self) -> None:
        # Kept: the history's columns and the inode, a piece per part.
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in KEPT_COLUMNS}
        self.states = np.zeros(16, np.int64)  # sockets in scope, by state
        self.held: dict[int, int] = {}  # pid -> sockets in scope it holds
        self.remote_ports: dict[int, int] = {}  # remote port -> connections this host made (services named)
        self.asked_carried: list[np.ndarray] = []  # carried idle flags among the sockets asked
        self.facts: list[SockFacts] = []
        self.rows = self.matched = self.candidates = self.queries = self.answered = self.idle = 0
        self._inodes: list[np.ndarray] = []  # sockets in scope, counted per process a batch at a time
        self._pending = 0

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts and pieces to this tally; its inodes not
        yet counted per process are left to this tally to count."""
        for name, pieces in other.parts.items():
            self.parts[name] += pieces
        self.states += other.states
        for mine, theirs in ((self.held, other.held), (self.remote_ports, other.remote_ports)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.asked_carried += other.asked_carried
        self.facts += other.facts
        self.rows += other.rows
        self.matched += other.matched
        self.candidates += other.candidates
        self.queries += other.queries
        self.answered += other.answered
        self.idle += other.idle
        self._inodes += other._inodes
        self._pending += other._pending

    def _count_held(self, owners: procs.SocketOwners) -> None:
        """Sockets in scope per process, for the inodes gathered since the
        last count (a search of every owner entry: a batch at a time, not a
        part at a time)."""
        inodes = np.concatenate(self._inodes) if self._inodes else np.zeros(0, np.uint32)
        self._inodes, self._pending = [], 0
        if len(inodes):  # each (socket, process) pair once
            pids, n = owners.held_counts(inodes)
            for pid, k in zip(pids.tolist(), n.tolist()):
                self.held[pid] = self.held.get(pid, 0) + k

    def asked_flags(self) -> np.ndarray:
        """The carried idle flags' cookies the walks asked about."""
        return np.concatenate(self.asked_carried) if self.asked_carried else np.zeros(0, np.uint64)

    def remote(self) -> dict[int, int]:
        """Remote port -> connections this host made to it (services named)."""
        return self.remote_ports


class Established(Tally):
    """The ESTABLISHED part of one full scan: :meth:`add` each part's
    rows as they come, :meth:`end_walk` as each walk ends; what is kept,
    of the walks that ended well, is read after the walk.

    ``budget``: how many more sockets the scan judges (its stuck ones
    came first); ``listen_rows``: the scan's LISTEN rows (for ``--pid``'s
    unaccepted sockets); ``listening``: the listening ports, when the
    scan names services (the remote ports of the rest are counted)."""

    def __init__(self, th: Thresholds, history: joins.History, idle_carry: IdleCarry, snap: Snapshot | None,
                 now: float, now_ns: int, key_by_ptr: bool, owners: procs.SocketOwners, pids: tuple[int, ...],
                 ports: tuple[int, ...], listen_rows: np.ndarray, listeners: joins.Listeners,
                 fin_timeout: dict[int, int | None], budget: int, listening: np.ndarray | None = None) -> None:
        super().__init__()
        self.th, self.history, self.idle_carry, self.snap = th, history, idle_carry, snap
        self.now, self.now_ns, self.key_by_ptr = now, now_ns, key_by_ptr
        self.owners, self.pids, self.ports, self.listen_rows = owners, pids, ports, listen_rows
        self.listeners, self.fin_timeout, self.budget = listeners, fin_timeout, budget
        self.listening = listening
        self.walk = Tally()  # the walk under way
        # The table's sorted keys, searched by every part's join.
        self.index = joins.TableIndex(snap) if snap is not None and len(snap.keys) and not key_by_ptr else None

    def add(self, rows: np.ndarray, info_of: Callable[..., Any]) -> None:
        """Judge one part's rows into the walk under way;
        ``info_of(sorted cookies, brief_below_ms)`` decodes their tcp_info
        (:meth:`Session.walk_info`)."""
        th, now, w = self.th, self.now, self.walk
        w.rows += len(rows)
        relevant = scope_mask(rows, self.owners, self.pids, self.ports, self.listen_rows)
        w.states += np.bincount(rows["state"][relevant], minlength=16)[:16]
        times = joins.join_table(rows, self.snap, self.now_ns, self.key_by_ptr, self.index)
        w.matched += times.matched
        hist = self.history.carry(rows, now)
        est_idx = query = joins.established_candidates(th, rows, relevant, times, hist, now)
        w.candidates += len(est_idx)
        asked = np.sort(rows["cookie"][query])
        infos = info_of(asked, th.idle_brief_ms)
        w.queries += len(query)
        w.answered += infos.answered
        w.asked_carried.append(self.idle_carry.asked_among(asked, np.arange(len(asked))))
        del asked, query
        idle = joins.idle_among(rows, est_idx, hist, infos, now, th.idle_after)
        w.idle += len(idle)
        take = idle[: max(0, self.budget - len(self.facts) - len(w.facts))]
        joins.judged_idle(hist, take, now, th.idle_recheck_s)
        w.facts += joins.judge(rows, take.tolist(), times, hist, infos, self.owners, self.listeners,
                               self.fin_timeout, now)
        del idle, take, infos, times, est_idx
        if len(self.owners):
            w._inodes.append(rows["inode"][relevant & (rows["inode"] != 0)])
            w._pending += len(w._inodes[-1])
            if w._pending >= joins.FACTS_CHUNK:
                w._count_held(self.owners)
        if self.listening is not None:  # connections this host made: their local port is no listener's
            out = ~np.isin(rows["lport"], self.listening) if len(self.listening) else slice(None)
            ports, n = np.unique(rows["rport"][out], return_counts=True)
            for port, k in zip(ports.tolist(), n.tolist()):
                w.remote_ports[port] = w.remote_ports.get(port, 0) + k
        keep = joins.remembered(rows)  # copies: nothing of the part's rows is kept
        for name in ("cookie", "state", "inode"):
            w.parts[name].append(rows[name][keep])
        for name in joins.HISTORY_TIMES:
            w.parts[name].append(hist.kept[name][keep])

    def end_walk(self, ok: bool) -> None:
        """A walk ended (``Session.walk_info``'s ``ended``): what was judged
        of its parts counts when it was read to its end (``ok``), and is
        dropped when it failed, as if it had handed out nothing: a failed
        dump keeps none of its rows either (``Session.dump``)."""
        if ok:
            self.merge(self.walk)
            if self._pending >= joins.FACTS_CHUNK:
                self._count_held(self.owners)
        self.walk = Tally()

    def finish(self) -> None:
        """After the walk: a walk whose end was not told counts as read to
        its end; count what is left to count, and let the table's sorted
        keys go (1.2 MB at 100k) before the history is stored."""
        self.end_walk(True)
        self._count_held(self.owners)
        self.index = None
