"""Leak detection, the library layer: gather facts, run the pure detectors.

:class:`Scanner` joins four sources, each for what it knows best:

* the BPF socket table (:mod:`pytracer.table.poll` snapshot): exact time each
  socket entered its state, whether it was accepted;
* the sock_diag inventory (:mod:`pytracer.inventory.session`): every TCP socket that
  exists, in every namespace, including TIME_WAIT and request sockets the
  table never holds, and the inode that links a socket to a process fd;
* tcp_info, for the candidates only: idle clocks, and lower bounds on
  time in state for sockets that predate the tracer (a full scan's
  ESTABLISHED sockets bring theirs in the walk that lists them, judged a
  part of the walk at a time: :mod:`pytracer.leaks.established`);
* /proc (:mod:`pytracer.inventory.procs`): who holds each socket, on which fd, and how
  close each process is to RLIMIT_NOFILE.

and hands them to :mod:`pytracer.leaks.detectors`.  A scan never raises: each stage
that fails is recorded in ``LeakReport.errors`` and the rest still runs.
Every loop is bounded (sockets, processes, fds, tcp_info queries).  History
(growth trends, what was already checked) lives in the Scanner, so call
``scan()`` on one instance repeatedly.

That is a *full* scan: its cost follows every socket and fd on the host.
With ``incremental=True`` (``tracer watch``, ``tracer export``) the scans in
between are *candidate* scans (:mod:`pytracer.leaks.incremental`), costing
in proportion to the sockets the BPF table puts past a threshold; a full
scan then runs when the last one is ``full_every`` (60 s) old, or older
when its duration over that gap would exceed ``full_budget`` (0.5% of a
core): whichever is rarer.  A candidate whose holder was not found brings
it forward to the budget alone.

The joins themselves are :mod:`pytracer.leaks.facts`; the one write a scan
makes (reaping a record whose socket is gone, :mod:`pytracer.leaks.reaper`)
goes through :mod:`pytracer.table.writer`.  Seeding is :mod:`pytracer.inventory.seed`,
the ``tracer watch`` cadence :mod:`pytracer.leaks.cadence`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

from pytracer.inventory import procs, sockdiag
from pytracer.inventory.owners import scan_fds, scope_mask
from pytracer.inventory.session import Session
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel.environment import give_back_heap
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks import facts as joins
from pytracer.leaks import incremental as incremental_scan
from pytracer.leaks.detectors import (
    Flag,
    SockFacts,
    Thresholds,
    idle_reset_flags,
    ordered,
    socket_flags,
)
from pytracer.leaks.established import Established
from pytracer.leaks.idle_carry import IdleCarry
from pytracer.leaks.processes import GrowthSample, fd_flags, growth_flags, growth_rate, update_growth
from pytracer.leaks.reaper import Reaper
from pytracer.leaks.report import LeakReport, ProcessSummary
from pytracer.leaks.time_wait import time_wait_findings
from pytracer.table.poll import Snapshot

__all__ = ["Flag", "LeakReport", "ProcessSummary", "Scanner", "Thresholds", "scope_mask"]

log = logging.getLogger(__name__)

S = TcpState
MAX_SOCKET_FACTS = 20000  # sockets built into Python objects per scan
# A table record whose socket sock_diag has not listed for this long (in two
# scans at least this far apart, record untouched between them) is reaped.
REAP_AFTER_S = 30.0
# Full scans (every socket, every fd table) between candidate scans: at most
# FULL_BUDGET of one core (their last duration over the gap), and no more
# often than every FULL_EVERY_S, whichever is rarer; as often as the budget
# allows while a candidate's holder is unknown.
FULL_EVERY_S = 60.0
FULL_BUDGET = 0.005
# Between full scans, TIME_WAIT per destination comes from a dump of the
# minisockets (and listeners) alone, every TIME_WAIT_EVERY_S or, when its
# last refresh over that gap would exceed TIME_WAIT_BUDGET of one core,
# rarer: its cost follows the TIME_WAIT count, not the host's sockets, and a
# storm leaves hundreds of thousands (~50 ms a refresh at 240,000 here,
# then every ~50 s; a full scan refreshes it too).
TIME_WAIT_EVERY_S = 15.0
TIME_WAIT_BUDGET = 0.001
# What a full scan keeps of each socket it lists: every inventory field but
# the owner's uid and the retransmit count, which no join or detector reads
# (75 bytes a socket instead of 80, held for every socket until the scan ends).
# The state a full scan walks on its own, judging it as it comes (most of a
# host with many live sockets: pytracer.leaks.established).
EST_BIT = 1 << int(TcpState.ESTABLISHED)
SCAN_FIELDS = tuple(n for n in sockdiag.INV_DTYPE.names if n not in ("uid", "retrans"))


def budget_gap(cost: float, budget: float, every: float = 0.0) -> float:
    """Seconds between runs of a task whose last run took ``cost`` seconds,
    so that it takes at most ``budget`` of one core, and never less than
    ``every``."""
    return max(every, cost / budget)


class Scanner:
    """One leak scan per :meth:`scan` call, with history between calls.

    ``tracer`` may be None (or keyed by pointer): then time in state comes
    only from the kernel's clocks and from how long this Scanner has seen the
    socket in its state.  ``pids`` restricts flags to sockets those processes
    hold (and unaccepted sockets in their listeners' queues); TIME_WAIT
    sockets belong to no process, so with ``pids`` they are neither dumped nor
    judged.

    What a Scanner remembers per socket (in numpy arrays, not per-socket
    objects): since when it has been seen in its current state, the last
    kernel lower bound on its time in state, when tcp_info was last asked
    for, and, for ESTABLISHED sockets, the earliest time it could possibly
    be idle for ``idle_after`` (so it is not asked again before then).

    The sources can be swapped (tests drive a Scanner with recorded facts):
    ``fd_scan(pids or None, proc)`` -> :class:`~pytracer.inventory.procs.FdScan`,
    ``netns_refs(fd_scan, proc)`` -> [NetnsRef], ``session(refs)`` -> a
    context manager like :class:`pytracer.inventory.session.Session`.  None
    means the real one, looked up at each scan.
    """

    def __init__(self, tracer: Any = None, thresholds: Thresholds | None = None, pids: Iterable[int] = (),
                 proc: str = procs.PROC, max_socket_facts: int = MAX_SOCKET_FACTS,
                 reap_after: float = REAP_AFTER_S, *, fd_scan: Callable[..., procs.FdScan] | None = None,
                 netns_refs: Callable[..., list[procs.NetnsRef]] | None = None,
                 session: Callable[[list[procs.NetnsRef]], Any] | None = None, incremental: bool = False,
                 full_every: float = FULL_EVERY_S, full_budget: float = FULL_BUDGET, ports: Iterable[int] = ()) -> None:
        self.tracer = tracer
        self.fd_scan = fd_scan
        self._netns_refs = netns_refs
        self.session_factory = session
        self.thresholds = thresholds or Thresholds()
        self.thresholds.validate()
        self.pids = tuple(sorted(set(int(p) for p in pids)))
        self.ports = tuple(sorted(set(int(p) for p in ports)))
        self.proc = proc
        self.max_socket_facts = max_socket_facts
        self._lock = threading.Lock()
        self._growth: dict[tuple, list[GrowthSample]] = {}
        self.proc_cache: dict[int, procs.ProcFacts] = {}
        self.history = joins.History()
        self.idle_carry = IdleCarry()  # idle flags between their rechecks
        self.scans = 0
        self.reaper = Reaper(tracer, reap_after)
        # The facts the last scan judged (for debugging and recording fixtures).
        self.last_facts: list[SockFacts] = []
        self.last_procs: dict[int, procs.ProcFacts] = {}
        # The last scan's cookie -> inode (sorted by cookie) and fd table, so a
        # view can name the holder of a socket the kernel table has no owner
        # for (an accepted socket with no accept hook) without a scan of its own.
        self._cookies = np.zeros(0, dtype=np.uint64)
        self._inodes = np.zeros(0, dtype=np.uint64)
        self.full_owners: procs.SocketOwners | procs.SocketOwners = procs.SocketOwners()
        # Candidate scans between full ones (pytracer.leaks.incremental).
        self.incremental = incremental
        self.full_every, self.full_budget = full_every, full_budget
        self.full_wanted = False  # a candidate's holder was not found: the next full scan is due early
        self.last_full_end: float | None = None
        self.last_full_cost = 0.0
        self.last_kind = ""  # "full" or "candidates"
        self.prev_scan_ns = 0
        self.refs: list[procs.NetnsRef] = []
        self.fin_timeouts: dict[int, int | None] = {}
        self.listen_holders: dict[tuple[int, int], set[int]] = {}
        self.carried: dict[str, Any] = {}
        self.summaries: dict[int, ProcessSummary] = {}
        # Rechecks (ESTABLISHED sockets to ask again once they could be idle)
        # are the history's own next-check times (History.due_rechecks);
        # these due ones were asked by a candidate scan and not answered:
        # left to the next full scan.
        self.recheck_skip = np.zeros(0, np.uint64)
        self.holder_cache: dict[int, tuple[Any, float]] = {}  # cookie -> ((pid, fd, inode) or None, when)
        # TIME_WAIT per destination between full scans (see incremental.refresh_time_wait).
        self.time_wait_every, self.time_wait_budget = TIME_WAIT_EVERY_S, TIME_WAIT_BUDGET
        self.last_time_wait: float | None = None
        self.time_wait_cost = 0.0  # the last refresh's duration, seconds
        self.services_cache: dict[int, Any] = {}  # see pytracer.table.services.read

    # -- the scan ----------------------------------------------------------

    def scan(self, snapshot: Snapshot | None = None) -> LeakReport:
        with self._lock:
            rep = LeakReport(mono_ns=time.monotonic_ns(), wall=time.time())
            t0 = time.perf_counter()
            try:
                self._scan(snapshot, rep)
            except Exception as exc:  # a scan never raises
                log.exception("leak scan failed")
                rep.errors.append(f"scan: {type(exc).__name__}: {exc}")
            self._idle_resets(rep, snapshot)
            self.scans += 1
            rep.stats["scan_seconds"] = round(time.perf_counter() - t0, 6)
            rep.stats["scans"] = self.scans
            return rep

    def _scan(self, snapshot: Snapshot | None, rep: LeakReport) -> None:
        if snapshot is None and self.tracer is not None and getattr(self.tracer, "obj", True) is not None:
            try:
                from pytracer.table import poll as poller

                snapshot = poller.snapshot(self.tracer, narrow=True)
            except Exception as exc:
                rep.errors.append(f"socket table: {exc}")

        if snapshot is not None and not self._full_due(snapshot):
            self.last_kind = "candidates"
            incremental_scan.scan(self, snapshot, rep)
            return
        self.last_kind = "full"
        t0 = time.perf_counter()
        try:
            self._full(snapshot, rep)
        finally:
            give_back_heap()  # its per-row arrays are gone; so are the small ones among them
            self.last_full_end, self.last_full_cost = time.monotonic(), time.perf_counter() - t0
            self.full_wanted = False

    def _idle_resets(self, rep: LeakReport, snapshot: Snapshot | None = None) -> None:
        """The per-service rule: judge the kernel's service histograms, as
        the snapshot's reader read them (``snapshot.services``), else read
        now (one lookup per service).  /proc is read only for the processes
        a flag names (most scans flag nothing)."""
        if self.tracer is None or getattr(self.tracer, "obj", True) is None:
            return
        try:
            if snapshot is not None and snapshot.services is not None:
                rep.services = snapshot.services
            else:
                from pytracer.table import services  # noqa: PLC0415 - only with a tracer

                rep.services = services.read(self.tracer, self.services_cache)
            found = idle_reset_flags(rep.services, {}, self.thresholds)
            pids = {f.pid for f in found if f.pid}
            if pids:  # the flags again, now naming their processes
                facts = {pid: pf for pid in sorted(pids)[:64] if (pf := self._proc_facts(pid)) is not None}
                found = idle_reset_flags(rep.services, facts, self.thresholds)
        except Exception as exc:  # a scan never raises
            rep.errors.append(f"services: {type(exc).__name__}: {exc}")
            return
        if found:
            rep.flags = ordered([*rep.flags, *found])

    def _name_services(self, rows: np.ndarray, rep: LeakReport, remote: dict[int, int] | None = None) -> None:
        """--service-ports auto, while running: ports this full scan finds
        listening (or busy as remote ports: in ``rows``, and ``remote``,
        counted as the ESTABLISHED sockets were walked) take the free
        service slots."""
        if self.tracer is None or not getattr(self.tracer, "services_auto", False):
            return
        try:
            from pytracer.inventory import services  # noqa: PLC0415 - only with a tracer
            from pytracer.table import writer  # noqa: PLC0415 - the one writer of the tracer's maps

            rep.stats["services_named"] = writer.add_services(self.tracer, services.from_rows(rows, remote=remote))
        except Exception as exc:  # a scan never raises
            rep.errors.append(f"services: {type(exc).__name__}: {exc}")

    def _full_due(self, snap: Snapshot) -> bool:
        if not self.incremental or self.last_full_end is None or getattr(self.tracer, "key_by_ptr", False):
            return True
        gap = budget_gap(self.last_full_cost, self.full_budget, 0.0 if self.full_wanted else self.full_every)
        return time.monotonic() - self.last_full_end >= gap

    def time_wait_due(self, now: float) -> bool:
        """Whether a candidate scan at ``now`` refreshes TIME_WAIT per
        destination (see TIME_WAIT_BUDGET); never before a full scan."""
        if self.pids or self.last_time_wait is None:
            return False
        return now - self.last_time_wait >= budget_gap(self.time_wait_cost, self.time_wait_budget,
                                                       self.time_wait_every)

    def _full(self, snapshot: Snapshot | None, rep: LeakReport) -> None:
        th = self.thresholds
        fdscan = (self.fd_scan or scan_fds)(self.pids or None, self.proc)
        rep.stats.update(processes_scanned=fdscan.processes, fds_scanned=fdscan.fds,
                         fd_scan_truncated=fdscan.truncated, fd_tables_unreadable=fdscan.unreadable)
        refs = (self._netns_refs or procs.netns_refs)(fdscan, self.proc)
        states = sockdiag.ALL_STATES
        if self.pids:
            # Only the namespaces the watched processes live in (and ours).
            wanted = {fdscan.netns_of[p] for p in self.pids if p in fdscan.netns_of}
            refs = [r for r in refs if r.label == "host" or r.ino in wanted]
            states &= ~((1 << int(S.TIME_WAIT)) | (1 << int(S.NEW_SYN_RECV)))

        with (self.session_factory or Session)(refs) as sess:
            # Every state but ESTABLISHED, whole; ESTABLISHED judged as walked, below.
            inv = sess.dump(states=states & ~EST_BIT, fields=SCAN_FIELDS)
            now = time.monotonic()
            now_ns = time.monotonic_ns()
            rep.errors.extend(inv.errors)
            rep.netns = [n.to_json() for n in inv.netns.values()]
            rows = joins.sort_by_cookie(inv.rows)
            host_ino = next((r.ino for r in refs if r.label == "host"), None)
            key_by_ptr = bool(getattr(self.tracer, "key_by_ptr", False))

            # Which sockets are ours to judge.
            owners = fdscan.sockets
            self.full_owners = owners
            relevant = scope_mask(rows, owners, self.pids, self.ports)
            listeners = joins.listeners(rows, owners)

            # Time in state: exact from the BPF table, else lower bounds.
            times = joins.join_table(rows, snapshot, now_ns, key_by_ptr)
            hist = self.history.carry(rows, now)
            fin_timeout = {ino: n.fin_timeout for ino, n in inv.netns.items()}
            stuck_idx, _, query = joins.candidates(th, rows, relevant, times, hist, fin_timeout, now)
            queried = self.idle_carry.asked_among(rows["cookie"], query)
            infos = TcpInfoTable()
            missed = 0
            if len(query):
                errors_before = len(sess.errors)
                infos, missed = sess.tcp_info(rows, th.max_exact_lookups, th.idle_brief_ms, idx=query)
                rep.errors.extend(sess.errors[errors_before:])
            stuck = stuck_idx.tolist()
            facts = joins.judge(rows, stuck[: self.max_socket_facts], times, hist, infos, owners, listeners,
                                fin_timeout, now)
            matched = times.matched
            del infos, times

            # ESTABLISHED: judged a part of the walk at a time (pytracer.leaks.established).
            listening = None
            if self.tracer is not None and getattr(self.tracer, "services_auto", False):
                listening = np.unique(rows["lport"][rows["state"] == int(S.LISTEN)])
            est = Established(th, self.history, self.idle_carry, snapshot, now, now_ns, key_by_ptr, owners,
                              self.pids, self.ports, rows, listeners, fin_timeout,
                              self.max_socket_facts - len(facts), listening)
            t_walk = time.perf_counter()
            walk_errors = len(sess.errors)
            if states & EST_BIT:  # a walk that fails partway counts for nothing (est.end_walk)
                for part, info_of in sess.walk_info(EST_BIT, SCAN_FIELDS, ended=est.end_walk):
                    est.add(part, info_of)
                    del part, info_of
            est.finish()
            rep.errors.extend(sess.errors[walk_errors:])
            partial = bool(inv.errors) or len(sess.errors) > walk_errors
            facts += est.facts
            if len(stuck) + est.idle > self.max_socket_facts:
                rep.errors.append(joins.not_judged(len(stuck) + est.idle, self.max_socket_facts))
            queried = np.concatenate([queried, est.asked_flags()])

            counts_by_state = np.bincount(rows["state"][relevant], minlength=16)[:16] + est.states
            rep.inventory_states = {TcpState.name_of(s): int(n) for s, n in enumerate(counts_by_state) if n}
            rep.stats.update(sockets=int(len(rows)) + est.rows, netns_covered=len(sess.socks),
                             netns_failed=len(refs) - len(sess.socks),
                             dump_seconds=round(inv.seconds + time.perf_counter() - t_walk, 6))
            rep.stats["table_records"] = int(len(snapshot.keys)) if snapshot is not None else None
            rep.stats["table_matched"] = matched + est.matched
            rep.stats.update(candidates=int(len(stuck_idx)) + est.candidates,
                             info_queries=int(len(query)) + est.queries,
                             info_missed=int(missed) + est.queries - est.answered)
            del query, stuck_idx

            # What is kept: the history of every socket but the minisockets,
            # and the inodes that name their holders, sorted by cookie.
            kept = joins.remembered(rows)
            for name in ("cookie", "state", "inode"):
                est.parts[name].insert(0, rows[name][kept])
            for name in joins.HISTORY_TIMES:
                est.parts[name].insert(0, hist.kept[name][kept])
            del hist, kept
            inodes = est.parts.pop("inode")
            order = self.history.store_parts(est.parts)
            self._cookies = self.history.cookies
            self._inodes = np.concatenate(inodes)[order] if inodes else np.zeros(0, np.uint32)
            del inodes, order
            if snapshot is not None:  # every socket the table can hold is in the history
                self.reaper.reap(snapshot, self.history.cookies, set(sess.socks), partial, now, now_ns)
            rep.stats["records_reaped"] = self.reaped
            self._name_services(rows, rep, est.remote())

            # Processes: who holds TCP sockets (or the --pid set).
            summaries, counts = self.process_counts(rows, relevant, owners, listeners, held=est.held)
            pfacts = {pid: self.proc_cache[pid] for pid in summaries if pid in self.proc_cache}

            self.last_facts, self.last_procs = facts, pfacts
            flags = socket_flags(facts, pfacts, th)
            idle = self.idle_carry.merge(IdleCarry.idle(flags), queried, snapshot,
                                         listed=self.history.cookies, limit=self.max_socket_facts)
            rep.stats["idle_carried"] = self.idle_carry.carried
            flags = IdleCarry.others(flags)
            flags += self.process_flags(now, counts, summaries, pfacts)

            # TIME_WAIT per destination (not under --pid: TIME_WAIT has no owner).
            if not self.pids:
                rep.time_wait, tw_flags = time_wait_findings(rows, inv.netns, host_ino, th)
                flags += tw_flags
            if self.incremental:  # what the candidate scans start from
                self.refs, self.fin_timeouts = list(refs), fin_timeout
                self.listen_holders = {k: {p for e in v for p, _ in e[2]} for k, v in listeners.items()}
                self.recheck_skip = np.zeros(0, np.uint64)  # the history's next checks hold again
                self.carried = incremental_scan.carry_of(rows, relevant, flags, rep)
                self.summaries = {pid: dataclasses.replace(p) for pid, p in summaries.items()}
                self.prev_scan_ns = now_ns
                self.holder_cache = {}
                self.last_time_wait = now

            rep.flags = ordered(flags) + idle  # idle_established sorts last; the carry keeps its own in order
            rep.processes = summaries

    @property
    def rechecks_by_cookie(self) -> bool:
        """Whether rechecks can name their sockets by cookie alone: the
        candidate scans that take them read their lookup keys from a table
        keyed by cookie (keyed by pointer, every scan is a full one)."""
        return self.tracer is not None and not getattr(self.tracer, "key_by_ptr", False)

    @property
    def reaped(self) -> int:
        """Table records deleted because their socket is gone (see pytracer.leaks.reaper)."""
        return self.reaper.reaped

    def holders(self, cookies: Iterable[int], snap: Snapshot | None = None) -> dict[int, tuple[int, int, int]]:
        """cookie -> (pid, fd, inode) of the first process holding it, as the
        last full scan found them (sockets nobody holds, or unseen, are left
        out); with ``snap``, sockets newer than that scan are resolved one
        by one (:func:`pytracer.leaks.incremental.resolve_holders`)."""
        out: dict[int, tuple[int, int, int]] = {}
        cookies = list(cookies)
        with self._lock:
            if len(self.full_owners) and len(self._cookies):
                self._known_holders(cookies, out)
            missing = [c for c in cookies if c not in out]
            if missing and snap is not None and self.incremental and self.last_full_end is not None:
                try:
                    out.update(incremental_scan.resolve_holders(self, snap, missing, time.monotonic()))
                except OSError as exc:
                    log.debug("holders of %d sockets not resolved: %s", len(missing), exc)
        return out

    def _known_holders(self, cookies: list[int], out: dict[int, tuple[int, int, int]]) -> None:
        for cookie in cookies:
            i = int(np.searchsorted(self._cookies, np.uint64(cookie)))
            if i < len(self._cookies) and int(self._cookies[i]) == cookie:
                ino = int(self._inodes[i])
                held = self.full_owners.get(ino)
                if held:
                    out[int(cookie)] = (*held[0], ino)

    # -- pieces ------------------------------------------------------------

    def _proc_facts(self, pid: int) -> procs.ProcFacts | None:
        start = procs.start_ticks(pid, self.proc)
        if start is None:
            return None
        cached = self.proc_cache.get(pid)
        # Same process (start time) and same program: exec() keeps the pid
        # and the start time but changes comm and cmdline.
        if cached is not None and cached.start_ticks == start and cached.comm == procs.comm(pid, self.proc):
            cached.open_fds = procs.count_fds(pid, self.proc)
            cached.max_fds = procs.nofile_limit(pid, self.proc)
            return cached
        pf = procs.facts(pid, self.proc)
        pf.start_ticks = start
        self.proc_cache[pid] = pf
        return pf

    def process_counts(self, rows: np.ndarray, relevant: np.ndarray, owners: procs.SocketOwners,
                       listeners: dict, carried: bool = False, held: dict[int, int] | None = None
                       ) -> tuple[dict[int, ProcessSummary], dict[tuple, int]]:
        """Per process: TCP sockets held and CLOSE_WAIT counts, from ``rows``
        (every socket in a full scan, with ``held``: pid -> sockets held
        among those counted as they were walked).  ``carried``: ``rows`` are
        a candidate scan's (every CLOSE_WAIT socket, but not every socket),
        so the other counts come from the last full scan's summaries."""
        per_pid_tcp: dict[int, int] = {}
        if carried:
            per_pid_tcp = {pid: p.tcp_sockets for pid, p in self.summaries.items()}
        else:
            tcp_inodes = rows["inode"][relevant & (rows["inode"] != 0)]
            if len(tcp_inodes) and len(owners):
                # Each (socket, process) pair once, however many fds it has.
                pids, n = owners.held_counts(tcp_inodes)
                per_pid_tcp = dict(zip(pids.tolist(), n.tolist()))
            for pid, k in (held or {}).items():
                per_pid_tcp[pid] = per_pid_tcp.get(pid, 0) + k
        cw_fd: dict[int, int] = {}
        cw_bl: dict[int, int] = {}
        for i in np.flatnonzero(relevant & (rows["state"] == int(S.CLOSE_WAIT))).tolist():
            ino = int(rows["inode"][i])
            if ino:
                for pid in {p for p, _ in owners.get(ino, [])}:
                    cw_fd[pid] = cw_fd.get(pid, 0) + 1
            else:
                r = rows[i]
                lst = joins.listener_of(listeners, int(r["netns"]), int(r["lport"]), bytes(r["laddr"]),
                                        int(r["family"]))
                for pid in {p for p, _ in (lst[2] if lst else [])}:
                    cw_bl[pid] = cw_bl.get(pid, 0) + 1
        wanted = set(self.pids) if self.pids else set(per_pid_tcp) | set(cw_bl) | set(cw_fd if carried else ())
        summaries: dict[int, ProcessSummary] = {}
        counts: dict[tuple, int] = {}
        for pid in sorted(wanted):
            pf = self._proc_facts(pid)
            if pf is None:
                continue
            summaries[pid] = ProcessSummary(
                pid=pid, comm=pf.comm, cmdline=pf.cmdline, cgroup=pf.cgroup, container=pf.container,
                open_fds=pf.open_fds, max_fds=pf.max_fds, tcp_sockets=per_pid_tcp.get(pid, 0),
                close_wait=cw_fd.get(pid, 0), close_wait_backlog=cw_bl.get(pid, 0),
            )
            counts[(pid, pf.start_ticks)] = cw_fd.get(pid, 0) + cw_bl.get(pid, 0)
        for pid in [p for p in self.proc_cache if p not in summaries]:
            del self.proc_cache[pid]
        return summaries, counts

    def process_flags(self, now: float, counts: dict[tuple, int], summaries: dict[int, ProcessSummary],
                      pfacts: dict[int, procs.ProcFacts]) -> list[Flag]:
        """close_wait_growth (the history advanced by one sample) and fd_exhaustion."""
        th = self.thresholds
        self._growth = update_growth(self._growth, now, counts, th)
        flags = growth_flags(self._growth, pfacts, th)
        for key, samples in self._growth.items():
            rate = growth_rate(samples, th)
            if rate is not None and key[0] in summaries:
                summaries[key[0]].close_wait_per_second = round(rate, 4)
        return flags + fd_flags(pfacts, th)
