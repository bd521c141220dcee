"""Leak detection, the library layer: gather facts, run the pure detectors.

:class:`Scanner` joins four sources, each for what it knows best:

* the BPF socket table (:mod:`pytracer.table.poll` snapshot): exact time each
  socket entered its state, whether it was accepted;
* the sock_diag inventory (:mod:`pytracer.inventory.sockdiag`): every TCP socket that
  exists, in every namespace, including TIME_WAIT and request sockets the
  table never holds, and the inode that links a socket to a process fd;
* tcp_info, asked for only the candidates: idle clocks, and lower bounds on
  time in state for sockets that predate the tracer;
* /proc (:mod:`pytracer.inventory.procs`): who holds each socket, on which fd, and how
  close each process is to RLIMIT_NOFILE.

and hands them to :mod:`pytracer.leaks.detectors`.  A scan never raises: each stage
that fails is recorded in ``LeakReport.errors`` and the rest still runs.
Every loop is bounded (sockets, processes, fds, tcp_info queries).  History
(growth trends, what was already checked) lives in the Scanner, so call
``scan()`` on one instance repeatedly.

:func:`seed` puts every pre-existing TCP socket into the kernel's table at
start, so the table (and ``tracer watch``) shows sockets older than the
tracer, marked "birth unknown".
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from pytracer.format import address
from pytracer.inventory import procs, sockdiag
from pytracer.kernel import abi
from pytracer.kernel.libbpf import LibbpfError
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import (
    Flag,
    GrowthSample,
    SockFacts,
    Thresholds,
    TimeWaitDest,
    combine_state_time,
    fd_flags,
    growth_flags,
    growth_rate,
    kernel_state_floor,
    ordered,
    socket_flags,
    time_wait_by_destination,
    time_wait_flags,
    update_growth,
)
from pytracer.table.poll import SOCK_DTYPE, Snapshot

__all__ = ["Flag", "LeakReport", "ProcessSummary", "Scanner", "SeedResult", "Thresholds", "seed", "watch_enricher"]

log = logging.getLogger(__name__)

S = TcpState
BPF_NOEXIST = 1  # include/uapi/linux/bpf.h
BPF_EXIST = 2
# States a seeded record can be in: full sockets the BPF side will see
# transition and be destroyed.  TIME_WAIT and request sockets are
# minisockets (no tcp_destroy_sock), and so are FIN_WAIT2 orphans in
# timewait: seeding them would leave records nobody deletes.
SEED_STATES = (S.ESTABLISHED, S.SYN_SENT, S.SYN_RECV, S.FIN_WAIT1, S.FIN_WAIT2, S.CLOSE_WAIT, S.LAST_ACK, S.LISTEN,
               S.CLOSING)
# States whose sockets the detectors look at one by one.
STUCK_STATES = (S.CLOSE_WAIT, S.LAST_ACK, S.FIN_WAIT2)
MAX_SOCKET_FACTS = 20000  # sockets built into Python objects per scan
# A table record whose socket sock_diag has not listed for this long (in two
# scans at least this far apart, record untouched between them) is reaped.
REAP_AFTER_S = 30.0
REAP_LOGGED = 5  # records described in the log per scan


def _is_wild(raw: np.ndarray) -> bool:
    return not bytes(raw).strip(b"\0")


@dataclass
class ProcessSummary:
    pid: int
    comm: str | None
    cmdline: str | None
    cgroup: str | None
    container: str | None
    open_fds: int | None
    max_fds: int | None
    tcp_sockets: int = 0
    close_wait: int = 0  # CLOSE_WAIT sockets it holds an fd for
    close_wait_backlog: int = 0  # CLOSE_WAIT sockets unaccepted in its listeners' queues
    close_wait_per_second: float | None = None  # when growing

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LeakReport:
    flags: list[Flag] = field(default_factory=list)
    time_wait: list[tuple[str, int, int]] = field(default_factory=list)  # (dest, count, ephemeral range size)
    # Sockets by state in every covered namespace (with pids: theirs only).
    inventory_states: dict[str, int] = field(default_factory=dict)
    processes: dict[int, ProcessSummary] = field(default_factory=dict)
    netns: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    mono_ns: int = 0
    wall: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": round(self.wall, 3),
            "flags": [f.to_json() for f in self.flags],
            "time_wait": [{"dest": d, "count": n, "range_size": r} for d, n, r in self.time_wait],
            "states": self.inventory_states,
            "processes": {str(pid): p.to_json() for pid, p in sorted(self.processes.items())},
            "netns": self.netns,
            "errors": self.errors,
            "stats": self.stats,
        }


def scope_mask(rows: np.ndarray, owners: procs.SocketOwners, pids: Iterable[int]) -> np.ndarray:
    """Sockets in scope: all, or those ``pids`` hold an fd for, plus the
    unaccepted (and orphaned) sockets on the ports of their listeners."""
    wanted = set(pids)
    if not wanted:
        return np.ones(len(rows), dtype=bool)
    held = owners.held_by(wanted)
    mask = np.isin(rows["inode"].astype(np.uint64), held) & (rows["inode"] != 0)
    lst = rows[mask & (rows["state"] == int(S.LISTEN))]
    if len(lst):
        key = rows["netns"].astype(np.uint64) * np.uint64(65536) + rows["lport"].astype(np.uint64)
        lkey = lst["netns"].astype(np.uint64) * np.uint64(65536) + lst["lport"].astype(np.uint64)
        mask |= (rows["inode"] == 0) & np.isin(key, lkey)
    return mask


# Per-socket history a Scanner carries between scans, one array each,
# aligned with the sorted cookies (see Scanner._carry).
_HISTORY = (("since", np.nan), ("not_before", 0.0), ("checked", 0.0), ("floor", np.nan), ("floor_at", np.nan))


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
    """

    def __init__(self, tracer: Any = None, thresholds: Thresholds | None = None, pids: Iterable[int] = (),
                 proc: str = procs.PROC, max_socket_facts: int = MAX_SOCKET_FACTS,
                 reap_after: float = REAP_AFTER_S) -> None:
        self.tracer = tracer
        self.thresholds = thresholds or Thresholds()
        self.thresholds.validate()
        self.pids = tuple(sorted(set(int(p) for p in pids)))
        self.proc = proc
        self.max_socket_facts = max_socket_facts
        self._lock = threading.Lock()
        self._growth: dict[tuple, list[GrowthSample]] = {}
        self._proc_cache: dict[int, procs.ProcFacts] = {}
        self._hist_cookie = np.zeros(0, np.uint64)
        self._hist_state = np.zeros(0, np.uint8)
        self._hist: dict[str, np.ndarray] = {name: np.zeros(0) for name, _ in _HISTORY}
        self.scans = 0
        self.reap_after = reap_after
        self.reaped = 0
        # Records whose socket the last scan could not find: key -> (state_ns,
        # transitions, monotonic seconds first missed).
        self._missing: dict[int, tuple[int, int, float]] = {}
        # The facts the last scan judged (for debugging and recording fixtures).
        self.last_facts: list[SockFacts] = []
        self.last_procs: dict[int, procs.ProcFacts] = {}

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
            self.scans += 1
            rep.stats["scan_seconds"] = round(time.perf_counter() - t0, 6)
            rep.stats["scans"] = self.scans
            return rep

    def _scan(self, snapshot: Snapshot | None, rep: LeakReport) -> None:
        th = self.thresholds
        if snapshot is None and self.tracer is not None and getattr(self.tracer, "obj", True) is not None:
            try:
                from pytracer.table import poll as poller

                snapshot = poller.snapshot(self.tracer)
            except Exception as exc:
                rep.errors.append(f"socket table: {exc}")

        fdscan = procs.scan_fds(self.pids or None, self.proc)
        rep.stats.update(processes_scanned=fdscan.processes, fds_scanned=fdscan.fds,
                         fd_scan_truncated=fdscan.truncated, fd_tables_unreadable=fdscan.unreadable)
        refs = procs.netns_refs(fdscan, self.proc)
        states = sockdiag.ALL_STATES
        if self.pids:
            # Only the namespaces the watched processes live in (and ours).
            wanted = {fdscan.netns_of[p] for p in self.pids if p in fdscan.netns_of}
            refs = [r for r in refs if r.label == "host" or r.ino in wanted]
            states &= ~((1 << int(S.TIME_WAIT)) | (1 << int(S.NEW_SYN_RECV)))

        with sockdiag.Session(refs) as sess:
            inv = sess.dump(states=states)
            now = time.monotonic()
            now_ns = time.monotonic_ns()
            rep.errors.extend(inv.errors)
            rep.netns = [n.to_json() for n in inv.netns.values()]
            rows = inv.rows
            rep.stats.update(sockets=int(len(rows)), netns_covered=len(sess.socks),
                             netns_failed=len(refs) - len(sess.socks), dump_seconds=round(inv.seconds, 6))
            host_ino = next((r.ino for r in refs if r.label == "host"), None)

            # Which sockets are ours to judge.
            owners = fdscan.sockets
            relevant = self._relevant(rows, owners)
            listeners = self._listeners(rows, owners)
            counts_by_state = np.bincount(rows["state"][relevant], minlength=16)
            rep.inventory_states = {TcpState.name_of(s): int(n) for s, n in enumerate(counts_by_state) if n}

            # Time in state: exact from the BPF table, else lower bounds.
            exact_s, table_bound_s, accepted, matched = self._join_table(rows, snapshot, now_ns)
            hist = self._carry(rows, now)
            rep.stats["table_records"] = int(len(snapshot.keys)) if snapshot is not None else None
            rep.stats["table_matched"] = int(matched.sum())
            if snapshot is not None:
                self._reap(snapshot, rows, set(sess.socks), bool(inv.errors), now, now_ns)
            rep.stats["records_reaped"] = self.reaped

            fin_timeout = {ino: n.fin_timeout for ino, n in inv.netns.items()}
            stuck_idx, est_idx, query = self._candidates(rows, relevant, exact_s, table_bound_s, hist,
                                                         fin_timeout, now)
            infos = sockdiag.TcpInfoTable()
            missed = 0
            if len(query):
                errors_before = len(sess.errors)
                infos, missed = sess.tcp_info(rows[query], th.max_exact_lookups)
                rep.errors.extend(sess.errors[errors_before:])
                hist["checked"][query] = now
            rep.stats.update(candidates=int(len(stuck_idx) + len(est_idx)), info_queries=int(len(query)),
                             info_missed=int(missed))

            facts = self._facts(rows, stuck_idx, est_idx, exact_s, table_bound_s, hist, accepted, infos, owners,
                                listeners, fin_timeout, now, rep)
            self._store(rows, hist)

            # Processes: who holds TCP sockets (or the --pid set).
            summaries, counts = self._processes(rows, relevant, owners, listeners)
            pfacts = {pid: self._proc_cache[pid] for pid in summaries if pid in self._proc_cache}

            self.last_facts, self.last_procs = facts, pfacts
            flags = socket_flags(facts, pfacts, th)
            self._growth = update_growth(self._growth, now, counts, th)
            flags += growth_flags(self._growth, pfacts, th)
            for key, samples in self._growth.items():
                rate = growth_rate(samples, th)
                if rate is not None and key[0] in summaries:
                    summaries[key[0]].close_wait_per_second = round(rate, 4)
            flags += fd_flags(pfacts, th)

            # TIME_WAIT per destination (not under --pid: TIME_WAIT has no owner).
            if not self.pids:
                port_ranges = {ino: n.port_range for ino, n in inv.netns.items()}
                dests: list[TimeWaitDest] = time_wait_by_destination(rows, port_ranges, host_ino, th.top,
                                                                     th.time_wait_warn_ratio)
                rep.time_wait = [(d.dest, d.count, d.range_size or 0) for d in dests[: th.top]]
                flags += time_wait_flags(dests, th, {ino: n.tw_reuse for ino, n in inv.netns.items()})

            rep.flags = ordered(flags)
            rep.processes = summaries

    # -- pieces ------------------------------------------------------------

    def _reap(self, snap: Snapshot, rows: np.ndarray, covered: set[int], partial: bool, now: float,
              now_ns: int) -> None:
        """Delete table records whose socket no longer exists, and count them.

        A record leaves the table when the kernel destroys its socket; if
        that event never reaches a program, the record would stay forever,
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
        absent = ~np.isin(snap.keys, rows["cookie"])
        absent &= np.isin(socks["state"], [int(st) for st in SEED_STATES])
        absent &= np.isin(socks["netns_ino"], netns)
        absent &= socks["state_ns"].astype(np.int64) < np.int64(now_ns - int(self.reap_after * 1e9))
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
        table = self.tracer.map("socks")
        logged = 0
        for i in due:
            key = struct.pack("=Q", int(snap.keys[i]))
            raw = table.lookup(key, SOCK_DTYPE.itemsize)
            if raw is None:
                continue  # destroyed meanwhile: the kernel counted it
            rec = np.frombuffer(raw, SOCK_DTYPE)[0]
            if (int(rec["state_ns"]), int(rec["transitions"])) != (int(socks["state_ns"][i]),
                                                                   int(socks["transitions"][i])):
                continue
            if not table.delete(key):
                continue
            self.reaped += 1
            if logged < REAP_LOGGED:
                logged += 1
                log.warning("reaped a table record whose socket is gone (no destroy event seen): cookie %d, %s, "
                            "port %d -> %d, netns %d, last change %.1f s ago", int(snap.keys[i]),
                            TcpState.name_of(int(rec["state"])), int(rec["lport"]), int(rec["rport"]),
                            int(rec["netns_ino"]), (now_ns - int(rec["state_ns"])) / 1e9)

    def _relevant(self, rows: np.ndarray, owners: procs.SocketOwners) -> np.ndarray:
        return scope_mask(rows, owners, self.pids)

    def _listeners(self, rows: np.ndarray, owners: procs.SocketOwners) -> dict[tuple[int, int], list]:
        """(netns, port) -> [(laddr raw, family, holders, (queued, limit))]."""
        out: dict[tuple[int, int], list] = {}
        for i in np.flatnonzero(rows["state"] == int(S.LISTEN)).tolist():
            r = rows[i]
            out.setdefault((int(r["netns"]), int(r["lport"])), []).append(
                (bytes(r["laddr"]), int(r["family"]), owners.get(int(r["inode"]), []),
                 (int(r["rqueue"]), int(r["wqueue"])))
            )
        return out

    @staticmethod
    def _listener_of(listeners: dict, netns: int, lport: int, laddr: bytes, family: int) -> tuple | None:
        best = None
        for addr, fam, holders, q in listeners.get((netns, lport), []):
            if addr == laddr and fam == family:
                return addr, fam, holders, q
            if not addr.strip(b"\0"):
                best = best or (addr, fam, holders, q)
        return best

    def _join_table(self, rows: np.ndarray, snap: Snapshot | None, now_ns: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per inventory row: exact seconds in state (NaN if unknown), seconds
        since a seeded record was put in (NaN), accepted (-1 unknown), and
        whether the table has it."""
        n = len(rows)
        exact = np.full(n, np.nan)
        bound = np.full(n, np.nan)
        accepted = np.full(n, -1, dtype=np.int8)
        matched = np.zeros(n, dtype=bool)
        if snap is None or not len(snap.keys) or getattr(self.tracer, "key_by_ptr", False):
            return exact, bound, accepted, matched
        order = np.argsort(snap.keys, kind="stable")
        keys = snap.keys[order]
        pos = np.minimum(np.searchsorted(keys, rows["cookie"]), len(keys) - 1)
        matched = keys[pos] == rows["cookie"]
        idx = order[pos]
        socks = snap.socks
        same = matched & (socks["state"][idx] == rows["state"])
        seeded_untouched = ((socks["flags"][idx] & abi.PT_F_SEEDED) != 0) & (socks["transitions"][idx] == 0)
        age = np.maximum((np.int64(now_ns) - socks["state_ns"][idx].astype(np.int64)) / 1e9, 0.0)
        exact = np.where(same & ~seeded_untouched, age, np.nan)
        bound = np.where(same & seeded_untouched, age, np.nan)
        accepted = np.where(matched, socks["accepted"][idx].astype(np.int8), -1).astype(np.int8)
        return exact, bound, accepted, matched

    def _carry(self, rows: np.ndarray, now: float) -> dict[str, np.ndarray]:
        """History aligned with ``rows``: carried over for sockets still in the
        state they were in last scan, fresh otherwise."""
        n = len(rows)
        out = {name: np.full(n, default) for name, default in _HISTORY}
        out["since"][:] = now
        if len(self._hist_cookie) and n:
            pos = np.minimum(np.searchsorted(self._hist_cookie, rows["cookie"]), len(self._hist_cookie) - 1)
            same = (self._hist_cookie[pos] == rows["cookie"]) & (self._hist_state[pos] == rows["state"])
            for name, _ in _HISTORY:
                out[name] = np.where(same, self._hist[name][pos], out[name])
        # Seconds seen in this state (the first sighting proves nothing), and
        # the last kernel floor, grown by the time since it was measured.
        out["seen"] = np.where(out["since"] < now, now - out["since"], np.nan)
        out["floor_now"] = out["floor"] + (now - out["floor_at"])
        return out

    def _store(self, rows: np.ndarray, hist: dict[str, np.ndarray]) -> None:
        order = np.argsort(rows["cookie"], kind="stable")
        self._hist_cookie = rows["cookie"][order].copy()
        self._hist_state = rows["state"][order].copy()
        self._hist = {name: hist[name][order].copy() for name, _ in _HISTORY}

    def _candidates(self, rows: np.ndarray, relevant: np.ndarray, exact: np.ndarray, table_bound: np.ndarray,
                    hist: dict[str, np.ndarray], fin_timeout: dict[int, int | None], now: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stuck-state rows to judge, ESTABLISHED rows to judge, rows to ask
        tcp_info for).  Vectorized."""
        th = self.thresholds
        state = rows["state"]
        is_tw = rows["timer"] == sockdiag.TIMER_TIMEWAIT
        ns_fin = np.full(len(rows), np.nan)
        for ino, ft in fin_timeout.items():
            if ft is not None:
                ns_fin[rows["netns"] == ino] = ft

        # Stuck states: every one is a candidate unless known to be young.
        thr = np.full(len(rows), np.inf)
        thr[state == int(S.CLOSE_WAIT)] = th.close_wait_after
        thr[state == int(S.LAST_ACK)] = th.last_ack_after
        fw2 = state == int(S.FIN_WAIT2)
        thr[fw2] = th.fin_wait2_after if th.fin_wait2_after is not None else np.where(np.isnan(ns_fin), np.inf,
                                                                                       ns_fin)[fw2]
        stuck = relevant & np.isin(state, [int(s) for s in STUCK_STATES])
        young = ~np.isnan(exact) & (exact < thr)
        # FIN_WAIT2 orphans in timewait: the timer was armed with fin_timeout,
        # so fin_timeout - remaining is how long they have waited.
        waited = np.where(is_tw, ns_fin - rows["expires_ms"] / 1000.0, np.nan)
        young |= is_tw & ~(waited >= thr)
        stuck &= ~young
        bound = np.fmax(np.fmax(table_bound, hist["seen"]), hist["floor_now"])
        # Ask tcp_info when the socket may be flagged (the idle clocks are
        # evidence) or no kernel floor is known yet; minisockets have none.
        ask_stuck = stuck & ~is_tw & (~np.isnan(exact) | np.isnan(hist["floor_now"]) | (bound >= thr))

        # ESTABLISHED: idle candidates, unless known to be younger than
        # idle_after, or checked recently enough that they cannot be idle yet.
        est = relevant & (state == int(S.ESTABLISHED)) & ~(~np.isnan(exact) & (exact < th.idle_after))
        est &= hist["not_before"] <= now

        q_est = np.flatnonzero(est)
        query = np.concatenate([np.flatnonzero(ask_stuck), q_est]).astype(np.intp)
        return np.flatnonzero(stuck).astype(np.intp), q_est.astype(np.intp), query

    def _facts(self, rows: np.ndarray, stuck_idx: np.ndarray, est_idx: np.ndarray, exact: np.ndarray,
               table_bound: np.ndarray, hist: dict[str, np.ndarray], accepted: np.ndarray,
               infos: sockdiag.TcpInfoTable, owners: procs.SocketOwners, listeners: dict,
               fin_timeout: dict[int, int | None], now: float, rep: LeakReport) -> list[SockFacts]:
        # ESTABLISHED: only the idle ones become objects; the rest just learn
        # when they could be idle at the earliest.
        idle_after = self.thresholds.idle_after
        found, idle_ms = infos.idle_ms(rows["cookie"][est_idx])
        answered = est_idx[found]
        idle = idle_ms[found] / 1000
        hist["not_before"][answered] = now + np.maximum(0.0, idle_after - idle)
        idle_idx = answered[idle >= idle_after].tolist()
        idx = stuck_idx.tolist() + idle_idx  # stuck sockets first
        if len(idx) > self.max_socket_facts:
            rep.errors.append(f"{len(idx) - self.max_socket_facts} flagged-looking sockets not judged this scan "
                              f"(more than {self.max_socket_facts})")
            idx = idx[: self.max_socket_facts]
        out = []
        for i in idx:
            r = rows[i]
            cookie, st, fam = int(r["cookie"]), int(r["state"]), int(r["family"])
            info = infos.get(cookie)
            state_name = TcpState.name_of(st)
            ft = fin_timeout.get(int(r["netns"]))
            floor = None
            if info is not None:
                floor = kernel_state_floor(state_name, last_ack_recv_seconds=info.last_ack_recv_ms / 1000,
                                           backoff=info.backoff, rto_seconds=info.rto_us / 1e6)
            elif int(r["timer"]) == sockdiag.TIMER_TIMEWAIT:
                floor = kernel_state_floor(state_name, timer=int(r["timer"]),
                                           expires_seconds=int(r["expires_ms"]) / 1000, fin_timeout=ft)
            if floor is not None:
                prev = hist["floor_now"][i]
                hist["floor"][i] = floor if np.isnan(prev) else max(floor, float(prev))
                hist["floor_at"][i] = now
                hist["floor_now"][i] = hist["floor"][i]
            floor_now = None if np.isnan(hist["floor_now"][i]) else float(hist["floor_now"][i])
            seen_bounds = [float(x) for x in (table_bound[i], hist["seen"][i]) if not np.isnan(x)]
            secs, is_exact = combine_state_time(None if np.isnan(exact[i]) else float(exact[i]),
                                                max(seen_bounds) if seen_bounds else None, floor_now)
            inode = int(r["inode"])
            f = SockFacts(
                cookie=cookie, netns=int(r["netns"]), family=fam, state=state_name,
                laddr=address(fam, r["laddr"]), lport=int(r["lport"]), raddr=address(fam, r["raddr"]),
                rport=int(r["rport"]), inode=inode, timer=int(r["timer"]),
                expires_seconds=int(r["expires_ms"]) / 1000, owners=list(owners.get(inode, [])) if inode else [],
                state_seconds=secs, state_exact=is_exact, fin_timeout=ft,
                accepted=None if accepted[i] < 0 else bool(accepted[i]),
            )
            if info is not None:
                f.idle_seconds = info.idle_ms / 1000
                f.last_ack_recv_seconds = info.last_ack_recv_ms / 1000
                f.retransmits, f.backoff, f.rto_seconds = info.retransmits, info.backoff, info.rto_us / 1e6
            if inode == 0:
                lst = self._listener_of(listeners, f.netns, f.lport, bytes(r["laddr"]), fam)
                if lst is not None:
                    f.listener_owners = list(lst[2])
                    f.listener_backlog = lst[3]
            out.append(f)
        return out

    def _proc_facts(self, pid: int) -> procs.ProcFacts | None:
        start = procs.start_ticks(pid, self.proc)
        if start is None:
            return None
        cached = self._proc_cache.get(pid)
        if cached is not None and cached.start_ticks == start:
            cached.open_fds = procs.count_fds(pid, self.proc)
            cached.max_fds = procs.nofile_limit(pid, self.proc)
            return cached
        pf = procs.facts(pid, self.proc)
        pf.start_ticks = start
        self._proc_cache[pid] = pf
        return pf

    def _processes(self, rows: np.ndarray, relevant: np.ndarray, owners: procs.SocketOwners,
                   listeners: dict) -> tuple[dict[int, ProcessSummary], dict[tuple, int]]:
        per_pid_tcp: dict[int, int] = {}
        tcp_inodes = rows["inode"][relevant & (rows["inode"] != 0)]
        if len(tcp_inodes) and len(owners):
            # Each (socket, process) pair once, however many fds it has.
            _, holder = owners.pairs(tcp_inodes.astype(np.uint64))
            pids, n = np.unique(holder, return_counts=True)
            per_pid_tcp = dict(zip(pids.tolist(), n.tolist()))
        cw_fd: dict[int, int] = {}
        cw_bl: dict[int, int] = {}
        for i in np.flatnonzero(relevant & (rows["state"] == int(S.CLOSE_WAIT))).tolist():
            ino = int(rows["inode"][i])
            if ino:
                for pid in {p for p, _ in owners.get(ino, [])}:
                    cw_fd[pid] = cw_fd.get(pid, 0) + 1
            else:
                r = rows[i]
                lst = self._listener_of(listeners, int(r["netns"]), int(r["lport"]), bytes(r["laddr"]),
                                        int(r["family"]))
                for pid in {p for p, _ in (lst[2] if lst else [])}:
                    cw_bl[pid] = cw_bl.get(pid, 0) + 1
        wanted = set(self.pids) if self.pids else set(per_pid_tcp) | set(cw_bl)
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
        for pid in [p for p in self._proc_cache if p not in summaries]:
            del self._proc_cache[pid]
        return summaries, counts


# --- seeding -----------------------------------------------------------------


@dataclass
class SeedResult:
    """What :func:`seed` put into the kernel's table."""

    seeded: int = 0  # records inserted
    existed: int = 0  # the kernel had a record already (it wins)
    failed: int = 0  # could not insert: table full or out of memory
    vanished: int = 0  # destroyed while we seeded; their records removed again
    repaired: int = 0  # changed state while we seeded; records rewritten from a fresh dump
    midlife_during: int = 0  # kernel mid-life records made while we inserted (-1: unknown)
    skipped: str | None = None  # why nothing was seeded
    by_state: dict[str, int] = field(default_factory=dict)
    with_owner: int = 0
    listeners: int = 0  # listening sockets' owners put into the "listeners" map
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.skipped:
            return f"pre-existing sockets not seeded: {self.skipped}; {self.listeners} listeners' owners recorded"
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.by_state.items())) or "none"
        text = (f"seeded {self.seeded} pre-existing sockets ({states}; {self.with_owner} with an owning process), "
                f"{self.existed} already tracked")
        if self.errors:
            text += "; problems: " + "; ".join(self.errors[:3])
        if self.failed:
            text += f", {self.failed} NOT inserted (socket table full: raise --max-sockets)"
        if self.vanished:
            text += f", {self.vanished} closed while seeding"
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _is_full(err: int) -> bool:
    return err in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC)


def _seed_listeners(tracer: Any, rows: np.ndarray, recs: np.ndarray, res: SeedResult) -> int:
    """Name pre-existing listeners' owners in the kernel's "listeners" map, so
    children born after start are attributed to them (and counted under --pid)."""
    try:
        lmap = tracer.map("listeners")
    except Exception:  # an object or backend without the map
        return 0
    n = 0
    for i in np.flatnonzero((rows["state"] == int(S.LISTEN)) & (recs["owner_tgid"] != 0)).tolist():
        key = bytes(abi.PtListenKey(int(rows["netns"][i]) & 0xFFFFFFFF, int(rows["lport"][i]), int(rows["family"][i])))
        try:
            lmap.update(key, struct.pack("=I", int(recs["owner_tgid"][i])), BPF_NOEXIST)
            n += 1
        except LibbpfError as exc:
            if exc.errno != errno.EEXIST and len(res.errors) < 10:
                res.errors.append(f"listeners: {exc}")
    return n


def _owner_columns(recs: np.ndarray, rows: np.ndarray, owners: procs.SocketOwners, proc: str) -> int:
    """Fill owner pid, fd, comm and cgroup id from the fd scan; /proc is read
    once per owning process, not per socket.  Returns sockets with an owner."""
    pid, fd = owners.first(rows["inode"].astype(np.uint64))
    has = pid != 0
    recs["owner_tgid"] = pid.astype(np.uint32)
    recs["owner_fd"] = fd.astype(np.int32)
    if not has.any():
        return 0
    uniq, inverse = np.unique(pid[has], return_inverse=True)
    comms = np.zeros(len(uniq), np.dtype("S16"))
    cgids = np.zeros(len(uniq), np.uint64)
    for j, p in enumerate(uniq.tolist()):
        comms[j] = (procs.comm(p, proc) or "").encode()[:15]
        cgids[j] = procs.cgroup_id(procs.cgroup(p, proc))
    recs["owner_comm"][has] = comms[inverse].view(np.dtype("S1")).reshape(-1, 16)
    recs["cgroup_id"][has] = cgids[inverse]
    return int(has.sum())


def _midlife_count(tracer: Any) -> int | None:
    """The kernel's count of sockets first seen mid-life (records it created
    for sockets older than the tracer), or None if unreadable."""
    try:
        from pytracer.table import poll as poller

        return poller.read_totals(tracer).stat(abi.Stat.MIDLIFE)
    except Exception:
        return None


def _insert_new(tracer: Any, socks: Any, keys: np.ndarray, recs: np.ndarray, res: SeedResult) -> np.ndarray:
    """Insert the records whose keys the kernel does not have yet, never
    overwriting one the kernel made; returns which went in.

    BPF_MAP_UPDATE_BATCH cannot take BPF_NOEXIST (the kernel accepts only
    BPF_F_LOCK per element), and one BPF_NOEXIST update per socket costs a
    syscall each (0.4 s per 100k sockets here).  So: read which keys exist
    (one batch lookup), write the others in one batch, and bracket both
    with the kernel's MIDLIFE counter.  For a socket that existed at the
    dump, the kernel makes a record in two ways only: midlife(), which
    counts before it inserts, and the deferred birth of an accepted child
    still in SYN_RECV (its "embryo"), so those few go in one by one with
    BPF_NOEXIST.  An unchanged counter then proves nothing was overwritten;
    when it moved, :func:`_repair` checks the seeded records against a
    fresh dump.
    """
    from pytracer.table import poll as poller

    before = _midlife_count(tracer)
    existing, _ = poller.read_socks(tracer)
    have = np.isin(keys, existing)
    del existing
    res.existed = int(have.sum())
    one_by_one = ~have & (recs["state"] == int(S.SYN_RECV))
    todo = np.flatnonzero(~have & ~one_by_one)
    ok = np.zeros(len(keys), dtype=bool)
    errs: list[int] = []
    if len(todo) == len(keys):
        k, v = keys, recs
    else:
        k, v = np.ascontiguousarray(keys[todo]), np.ascontiguousarray(recs[todo])
    _, failures = socks.update_batch(k, v, len(todo))
    ok[todo] = True
    for j, err in failures:
        ok[todo[j]] = False
        errs.append(err)
    after = _midlife_count(tracer)
    for i in np.flatnonzero(one_by_one).tolist():
        try:
            socks.update(keys[i].tobytes(), recs[i].tobytes(), BPF_NOEXIST)
            ok[i] = True
        except LibbpfError as exc:
            if exc.errno == errno.EEXIST:
                res.existed += 1
            else:
                errs.append(exc.errno)
    for err in errs:
        res.failed += 1
        if not _is_full(err) and len(res.errors) < 10:
            res.errors.append(f"insert: {os.strerror(err)}")
    res.midlife_during = -1 if before is None or after is None else after - before
    return ok


def _repair(socks: Any, keys: np.ndarray, recs: np.ndarray, ok: np.ndarray, live: np.ndarray,
            res: SeedResult) -> None:
    """The kernel saw sockets change state while we seeded (see
    :func:`_insert_new`): a seeded record that is still untouched but whose
    socket is now in another state may have overwritten the kernel's own.
    Rewrite those from the fresh dump (``live``), as seeded records."""
    order = np.argsort(live["cookie"], kind="stable")
    lk = live["cookie"][order]
    if not len(lk):
        return
    pos = np.minimum(np.searchsorted(lk, keys), len(lk) - 1)
    found = ok & (lk[pos] == keys)
    now_state = live["state"][order][pos]
    for i in np.flatnonzero(found & (now_state != recs["state"])).tolist():
        key = struct.pack("=Q", int(keys[i]))
        raw = socks.lookup(key, SOCK_DTYPE.itemsize)
        if raw is None:
            continue
        rec = np.frombuffer(raw, SOCK_DTYPE)[0].copy()
        if not (rec["flags"] & abi.PT_F_SEEDED) or rec["transitions"] != 0:
            continue  # the kernel has moved it on since: its record is current
        rec["state"] = now_state[i]
        rec["state_ns"] = time.monotonic_ns()
        try:
            socks.update(key, rec.tobytes(), BPF_EXIST)
            res.repaired += 1
        except LibbpfError:
            continue


def seed(tracer: Any, pids: Iterable[int] | None = None, proc: str = procs.PROC) -> SeedResult:
    """Insert every existing TCP socket into the kernel table (see module doc).

    Records get ``PT_F_SEEDED | PT_F_BIRTH_UNKNOWN``, birth 0, ``counted`` 0
    (they stay out of the histograms: their lifetimes are unknown), the state
    sock_diag reports, ``state_ns`` the time of the dump (so "time in state"
    reads "at least"), the owner found in /proc, and the inode.  A record
    the kernel created meanwhile wins (see :func:`_insert_new`).

    The records are built as one numpy array and go in with one
    BPF_MAP_UPDATE_BATCH; each element that fails (table full) is counted
    and the batch carries on after it.
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
        fdscan = procs.scan_fds(pids or None, proc)
        refs = procs.netns_refs(fdscan, proc)
        if pids:
            wanted = {fdscan.netns_of[p] for p in pids if p in fdscan.netns_of}
            refs = [r for r in refs if r.label == "host" or r.ino in wanted]
        with sockdiag.Session(refs) as sess:
            inv = sess.dump(states=states)
            seen_ns = time.monotonic_ns()  # after the dump: a valid "at least" origin
            res.errors.extend(inv.errors)
            rows = inv.rows
            del inv
            mask = np.isin(rows["state"], [int(s) for s in SEED_STATES]) & (rows["timer"] != sockdiag.TIMER_TIMEWAIT)
            mask &= scope_mask(rows, fdscan.sockets, pids)
            if by_ptr:
                mask &= rows["state"] == int(S.LISTEN)
            if not mask.all():
                rows = rows[mask]
            del mask
            recs = np.zeros(len(rows), SOCK_DTYPE)
            recs["state_ns"] = seen_ns
            recs["ino"] = rows["inode"]
            recs["netns_ino"] = rows["netns"].astype(np.uint32)
            recs["state"] = rows["state"]
            recs["direction"] = np.where(rows["state"] == int(S.LISTEN), int(abi.Direction.LISTEN),
                                         int(abi.Direction.UNKNOWN))
            recs["flags"] = abi.PT_F_SEEDED | abi.PT_F_BIRTH_UNKNOWN
            recs["family"] = rows["family"]
            recs["lport"] = rows["lport"]
            recs["rport"] = rows["rport"]
            recs["laddr"] = rows["laddr"]
            recs["raddr"] = rows["raddr"]
            res.with_owner = _owner_columns(recs, rows, fdscan.sockets, proc)
            del fdscan
            if by_ptr:
                res.listeners = _seed_listeners(tracer, rows, recs, res)
                res.seconds = round(time.perf_counter() - t0, 6)
                return res
            socks = tracer.map("socks")
            keys = np.ascontiguousarray(rows["cookie"], dtype=np.uint64)
            ok = _insert_new(tracer, socks, keys, recs, res)
            counts = np.bincount(rows["state"][ok], minlength=abi.PT_STATES)
            res.by_state = {TcpState.name_of(st): int(n) for st, n in enumerate(counts) if n}
            res.seeded = int(ok.sum())
            res.listeners = _seed_listeners(tracer, rows, recs, res)
            if res.seeded:
                if res.midlife_during:
                    _repair(socks, keys, recs, ok, sess.dump(states=states).rows, res)
                try:
                    live = sess.cookies(states=states)
                except OSError as exc:
                    live = keys  # cannot tell what closed: take nothing back
                    res.errors.append(f"re-checking seeded sockets: {exc}")
                # A socket destroyed between the dump and its insert left a
                # record no destroy event will remove: take back the untouched ones.
                for i in np.flatnonzero(ok & ~np.isin(keys, live)).tolist():
                    key = struct.pack("=Q", int(keys[i]))
                    raw = socks.lookup(key, SOCK_DTYPE.itemsize)
                    if raw is None:
                        continue
                    rec = np.frombuffer(raw, SOCK_DTYPE)[0]
                    if rec["flags"] & abi.PT_F_SEEDED and rec["transitions"] == 0 and socks.delete(key):
                        res.vanished += 1
                        res.seeded -= 1
                        name = TcpState.name_of(int(rows["state"][i]))
                        res.by_state[name] -= 1
                        if not res.by_state[name]:
                            del res.by_state[name]
    except Exception as exc:  # seeding is best effort: the scan finds these sockets anyway
        log.warning("seeding pre-existing sockets failed: %s", exc)
        res.errors.append(f"seeding: {type(exc).__name__}: {exc}")
    res.seconds = round(time.perf_counter() - t0, 6)
    return res


# --- tracer watch integration -------------------------------------------------


def watch_enricher(thresholds: Thresholds, duty: float = 0.25):
    """An enricher for ``tracer watch`` (see pytracer/cli/watch.py): each report
    gets ``flags``, the TIME_WAIT / NEW_SYN_RECV counts the table cannot hold,
    and a ``leaks`` summary.

    A scan walks /proc and dumps every socket; on a busy host that takes a
    noticeable part of a second.  To keep it under ``duty`` of the wall clock,
    a new scan starts only once (1/duty - 1) times the last scan's duration
    has passed; reports in between repeat the last findings, and
    ``leaks.age_seconds`` says how old they are.
    """

    def enrich(report: dict[str, Any], snap: Snapshot, tracer: Any, opts: Any, state: dict[str, Any]) -> None:
        scanner = state.get("leak_scanner")
        if scanner is None:
            scanner = state["leak_scanner"] = Scanner(tracer, thresholds, pids=getattr(opts, "pids", ()))
        last = state.get("leak_last")  # (report, monotonic end, cost)
        now = time.monotonic()
        if last is None or now - last[1] >= last[2] * (1.0 / duty - 1.0):
            lr = scanner.scan(snap)
            last = state["leak_last"] = (lr, time.monotonic(), float(lr.stats.get("scan_seconds") or 0.0))
        lr = last[0]
        report["flags"] = [f.to_json() for f in lr.flags]
        if not scanner.pids:
            for name in ("TIME_WAIT", "NEW_SYN_RECV"):
                if lr.inventory_states.get(name):
                    report["states"][name] = lr.inventory_states[name]
        report["leaks"] = {
            "time_wait": [{"dest": d, "count": n, "range_size": r} for d, n, r in lr.time_wait],
            "errors": lr.errors,
            "scan_seconds": lr.stats.get("scan_seconds"),
            "age_seconds": round(max(0.0, now - lr.mono_ns / 1e9), 3),
            "netns_covered": lr.stats.get("netns_covered"),
            "records_reaped": lr.stats.get("records_reaped", 0),
        }

    return enrich
