"""The leak scan between full scans: in proportion to its candidates.

A full scan (:meth:`pytracer.leaks.scanner.Scanner._full`) dumps every
socket of every namespace and walks every fd table: its cost follows the
host, ~1 s at 100k sockets.  But the BPF socket table already knows each
socket's state and since when (``state_ns``), so between full scans a
*candidate scan* (:func:`scan`) asks the kernel only about the sockets that
can be flagged now:

* every CLOSE_WAIT record (the per-process counts behind
  ``close_wait_growth`` need their holders; a healthy host has few);
* LAST_ACK and FIN_WAIT2 records past their thresholds (or seeded: their
  age is only a lower bound);
* ESTABLISHED records whose time in state crossed ``idle_after`` since the
  previous scan (exact, from the table), and the ones whose next possible
  idle time (``not_before`` in the history, from tcp_info) has come.

For those only: sock_diag exact lookups by 4-tuple and cookie (their
current state, inode, queues and tcp_info), the lookups of their
listeners when unaccepted, and an fd scan bounded to the processes that can
hold them (``owner_tgid``, ``listener_tgid``, the holders of their listener
and their last known holders), the kernel visiting no other process
(:meth:`pytracer.inventory.fdscan.FdIterators.scan_each`).  Everything per
socket is O(candidates); over the table it is a few vectorized compares.

What the table cannot know stays with the full scan, on its slow cadence:
pre-existing sockets of unknown age beyond their seeding, new network
namespaces, the reaper,
processes that newly hold TCP sockets.  A candidate whose holder the
bounded fd scan does not find (an fd inherited by a child, passed over a
unix socket) is not flagged here but brings the next full scan forward.
TIME_WAIT per destination and the other minisockets come from a dump of
those states alone (:func:`refresh_time_wait`) every 15 s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pytracer.arrays import find_sorted
from pytracer.inventory import fdscan, sockdiag
from pytracer.inventory.owners import scan_fds, scope_mask
from pytracer.inventory.procs import FdScan
from pytracer.inventory.session import Session
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel import abi
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks import facts as joins
from pytracer.leaks.detectors import ordered, socket_flags
from pytracer.leaks.idle_carry import IdleCarry
from pytracer.leaks.report import LeakReport
from pytracer.leaks.time_wait import time_wait_findings
from pytracer.table.poll import Snapshot

# ``sc`` below is the pytracer.leaks.scanner.Scanner running the scan (its
# state between scans lives there; not imported: it imports this module).
Scanner = Any
S = TcpState
MAX_BOUND_PIDS = 64  # past this many processes, one filtered pass of every fd table instead


def due_index(due: np.ndarray, snap: Snapshot) -> np.ndarray:
    """Table indices of the sockets ``due`` (ascending cookies: rechecks
    from :meth:`pytracer.leaks.facts.History.due_rechecks`), each once.  A
    socket the table no longer has is dropped: it has ended (its record
    goes with it), or the table never had it, and then the next full scan,
    which keeps each socket's next check in its history, asks again.  One
    search of the table's keys in the few due cookies, no sort of the
    table."""
    if not len(due):
        return np.zeros(0, np.intp)
    pos, hit = find_sorted(due, snap.keys)
    at = np.flatnonzero(hit)  # table indices of due sockets
    _, first = np.unique(pos[at], return_index=True)  # a cookie read twice (both maps) counts once
    return at[first]


def table_rows(snap: Snapshot, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lookup keys (sockdiag.LOOKUP_DTYPE), records) of the table records
    ``idx`` still there (:meth:`Snapshot.records_at`: a narrow table is
    read again by cookie, so both are the records' current ones)."""
    idx, socks = snap.records_at(idx)
    out = np.zeros(len(idx), sockdiag.LOOKUP_DTYPE)
    out["cookie"] = snap.keys[idx]
    out["netns"] = socks["netns_ino"]
    for name in ("family", "state", "lport", "rport", "laddr", "raddr"):
        out[name] = socks[name]
    return out, socks


def select(snap: Snapshot, sc: Scanner, now_ns: int, prev_ns: int) -> np.ndarray:
    """Indices of the table records a candidate scan looks at (see the
    module docstring).  A few compares over the table, nothing per record."""
    th = sc.thresholds
    socks = snap.socks
    st = socks["state"]
    age_ns = np.int64(now_ns) - socks["state_ns"].astype(np.int64)
    seeded = ((socks["flags"] & abi.PT_F_SEEDED) != 0) & (socks["transitions"] == 0)
    fw2_after = th.fin_wait2_after
    if fw2_after is None:
        known = [v for v in sc.fin_timeouts.values() if v is not None]
        fw2_after = min(known) if known else 0.0
    m = st == int(S.CLOSE_WAIT)
    m |= (st == int(S.LAST_ACK)) & (seeded | (age_ns >= np.int64(th.last_ack_after * 1e9)))
    m |= (st == int(S.FIN_WAIT2)) & (seeded | (age_ns >= np.int64(fw2_after * 1e9)))
    idle_ns = np.int64(th.idle_after * 1e9)
    # Crossed idle_after since the previous scan: (prev - state_ns) < idle <= (now - state_ns).
    m |= (st == int(S.ESTABLISHED)) & ~seeded & (age_ns >= idle_ns) & (age_ns - (now_ns - prev_ns) < idle_ns)
    return np.flatnonzero(m)


def _owner_pids(sc: Scanner, socks: np.ndarray, rows: np.ndarray, lst_socks: np.ndarray) -> set[int]:
    """Processes that can hold the candidates: the table's owner and
    listener (of their records ``socks``; ``lst_socks``: their listeners'),
    their listener's holders and the last full scan's holders."""
    if sc.pids:
        return set(sc.pids)
    pids: set[int] = set()
    for name in ("owner_tgid", "listener_tgid"):
        pids.update(socks[name].tolist())
    pids.update(lst_socks["owner_tgid"].tolist())
    if sc.listen_holders and len(rows):
        ports = np.unique(rows["netns"].astype(np.uint64) * np.uint64(65536) + rows["lport"].astype(np.uint64))
        for key in ports.tolist():
            pids.update(sc.listen_holders.get((key >> 16, key & 0xFFFF), ()))
    inodes = rows["inode"][rows["inode"] != 0]
    if len(inodes) and len(sc.full_owners):
        pids.update(sc.full_owners.holder_pids(inodes).tolist())
    pids.discard(0)
    return pids


def _fd_scan(sc: Scanner, pids: set[int]) -> FdScan:
    if len(pids) <= MAX_BOUND_PIDS and sc.proc == fdscan.PROC and sc.fd_scan is None:
        try:
            return fdscan.shared().scan_each(pids, sc.proc)
        except (fdscan.FdScanUnavailable, OSError):
            pass
    return (sc.fd_scan or scan_fds)(sorted(pids), sc.proc)


def scan(sc: Scanner, snap: Snapshot, rep: LeakReport) -> None:
    """One candidate scan into ``rep`` (same fields as a full scan; what
    only a full scan measures is carried from the last one)."""
    th = sc.thresholds
    now, now_ns = time.monotonic(), time.monotonic_ns()
    idx = select(snap, sc, now_ns, sc.prev_scan_ns or now_ns)
    sc.prev_scan_ns = now_ns
    # Rechecks: the history keeps each one's time; the table says the rest.
    due = sc.history.due_rechecks(now, sc.recheck_skip) if sc.rechecks_by_cookie else np.zeros(0, np.uint64)
    idx = np.concatenate([idx, due_index(due, snap)])
    cand, socks = table_rows(snap, idx)
    # Read again whole (a narrow table), a record can be newer than now_ns.
    age = np.maximum(now_ns - socks["state_ns"].astype(np.int64), 0) / 1e9
    seeded = ((socks["flags"] & abi.PT_F_SEEDED) != 0) & (socks["transitions"] == 0)
    exact_c = np.where(seeded, np.nan, age)
    bound_c = np.where(seeded, age, np.nan)
    acc_c = socks["accepted"].astype(np.int8)
    # A socket both in the table's selection and due for a recheck: once.
    _, first = np.unique(cand["cookie"], return_index=True)
    first.sort()
    cand, exact_c, bound_c, acc_c = cand[first], exact_c[first], bound_c[first], acc_c[first]
    state_c = cand["state"].copy()

    # Listeners of passive candidates, for sockets still in an accept queue.
    st = snap.socks["state"]
    ports = np.unique(cand["lport"]) if len(cand) else []
    lst_idx = np.flatnonzero((st == int(S.LISTEN)) & np.isin(snap.socks["lport"], ports)) if len(ports) else \
        np.zeros(0, np.intp)
    lst_cand, lst_socks = table_rows(snap, lst_idx)
    ask = np.concatenate([cand, lst_cand])
    wanted = {int(c) for c in np.unique(ask["netns"])}
    refs = [ref for ref in sc.refs if (ref.ino & 0xFFFFFFFF) in wanted]
    if len(refs) < len(wanted):
        sc.full_wanted = True  # a namespace the last full scan did not know
    rows = np.zeros(0, sockdiag.INV_DTYPE)
    infos = TcpInfoTable()
    missed = 0
    if len(ask):
        with (sc.session_factory or Session)(refs) as sess:
            found, infos, missed = sess.lookup(ask, th.max_exact_lookups, th.idle_brief_ms)
            rep.errors.extend(e for e in sess.errors if "lookup" in e)
            for ino, info in sess.netns.items():
                sc.fin_timeouts[ino] = info.fin_timeout
            # The table's netns_ino is 32 bits; the session's are whole.
            full_ns = {ref.ino & 0xFFFFFFFF: ref.ino for ref in refs}
            found["netns"] = [full_ns.get(int(n) & 0xFFFFFFFF, int(n)) for n in found["netns"]]
            rows = found
    is_lst = rows["state"] == int(S.LISTEN)
    lst_rows, rows = rows[is_lst], rows[~is_lst]

    pids = _owner_pids(sc, socks, np.concatenate([rows, lst_rows]), lst_socks)
    scan_ = _fd_scan(sc, pids) if pids else FdScan()
    owners = scan_.sockets
    relevant = scope_mask(rows, owners, sc.pids, sc.ports)
    listeners = joins.listeners(lst_rows, owners)

    # Time in state from the table, where it still holds (same state).
    pos = {int(c): i for i, c in enumerate(cand["cookie"].tolist())}
    at = np.array([pos[int(c)] for c in rows["cookie"].tolist()], np.intp)
    same = state_c[at] == rows["state"] if len(at) else np.zeros(0, bool)
    exact = np.where(same, exact_c[at], np.nan) if len(at) else np.zeros(0)
    bound = np.where(same, bound_c[at], np.nan) if len(at) else np.zeros(0)
    accepted = acc_c[at] if len(at) else np.zeros(0, np.int8)

    times = joins.TableTimes.of(exact, bound, accepted)
    hist = sc.history.carry(rows, now)
    fin_timeout = dict(sc.fin_timeouts)
    stuck_idx, est_idx, query = joins.candidates(th, rows, relevant, times, hist, fin_timeout, now)
    facts = joins.sock_facts(rows, stuck_idx, est_idx, times, hist, infos, owners, listeners, fin_timeout, now,
                             th.idle_after, sc.max_socket_facts, rep.errors, th.idle_recheck_s)
    sc.history.merge(rows, hist)
    if len(due):  # due and not answered (gone, or no longer judged here): left to the next full scan
        est_cookies = rows["cookie"][est_idx]
        answered = np.sort(est_cookies[infos.idle_ms(est_cookies)[0]])
        sc.recheck_skip = np.union1d(sc.recheck_skip, due[~find_sorted(answered, due)[1]])
    unresolved = [f for f in facts if f.inode and not f.owners]
    if unresolved:
        sc.full_wanted = True
        facts = [f for f in facts if not (f.inode and not f.owners)]

    summaries, counts = sc.process_counts(rows, relevant, owners, listeners, carried=True)
    pfacts = {pid: sc.proc_cache[pid] for pid in summaries if pid in sc.proc_cache}
    sc.last_facts, sc.last_procs = facts, pfacts
    flags = socket_flags(facts, pfacts, th)
    idle = sc.idle_carry.merge(IdleCarry.idle(flags), rows["cookie"][query], snap, limit=sc.max_socket_facts)
    flags = IdleCarry.others(flags)
    flags += sc.process_flags(now, counts, summaries, pfacts)
    if sc.time_wait_due(now):
        refresh_time_wait(sc, rep, now)
    flags += list(sc.carried.get("flags", []))
    rep.flags = ordered(flags) + idle  # idle_established sorts last; the carry keeps its own in order
    rep.processes = summaries
    rep.time_wait = list(sc.carried.get("time_wait", []))
    rep.netns = list(sc.carried.get("netns", []))
    rep.inventory_states = _states(snap, sc)
    rep.stats.update(sc.carried.get("stats", {}))
    rep.stats.update(processes_scanned=scan_.processes, fds_scanned=scan_.fds, fd_scan_truncated=scan_.truncated,
                     fd_tables_unreadable=scan_.unreadable, table_records=int(len(snap.keys)),
                     table_matched=int(len(rows)), records_reaped=sc.reaped,
                     candidates=int(len(stuck_idx) + len(est_idx)), info_queries=int(len(query)),
                     info_missed=int(missed), idle_carried=sc.idle_carry.carried)


def resolve_holders(sc: Scanner, snap: Snapshot, cookies: list[int], now: float) -> dict[int, tuple[int, int, int]]:
    """cookie -> (pid, fd, inode) for a few table sockets the last full
    scan did not know (a view's shown rows): their inode by exact lookup,
    their holder by an fd scan bound to their owner, listener and its
    holders.  Answers are kept (a socket rarely changes hands); a socket
    not resolved is tried again after a few seconds."""
    out: dict[int, tuple[int, int, int]] = {}
    ask = []
    for c in cookies:
        got = sc.holder_cache.get(c)
        if got is None or (got[0] is None and now - got[1] >= 5.0):
            ask.append(c)
        elif got[0] is not None:
            out[c] = got[0]
    if not ask or not len(snap.keys):
        return out
    idx = np.flatnonzero(np.isin(snap.keys, np.asarray(ask[:32], np.uint64)))
    rows, socks = table_rows(snap, idx)
    wanted = {int(n) for n in np.unique(rows["netns"])}
    refs = [ref for ref in sc.refs if (ref.ino & 0xFFFFFFFF) in wanted]
    with (sc.session_factory or Session)(refs) as sess:
        found, _, _ = sess.lookup(rows, sc.thresholds.max_exact_lookups)
    owners = _fd_scan(sc, _owner_pids(sc, socks, found, socks[:0])).sockets
    if len(sc.holder_cache) > 4096:
        sc.holder_cache.clear()
    for c in ask[:32]:
        sc.holder_cache[c] = (None, now)
    for cookie, ino in zip(found["cookie"].tolist(), found["inode"].tolist()):
        held = owners.get(int(ino)) if ino else None
        if held:
            out[int(cookie)] = (*min(held), int(ino))
    sc.holder_cache.update({c: (v, now) for c, v in out.items() if c in ask})
    return out


# What a TIME_WAIT refresh dumps: the minisockets, FIN_WAIT2 (orphans are
# minisockets too) and the listeners (their ports are not "used up").
TIME_WAIT_STATES = sum(1 << int(s) for s in (S.TIME_WAIT, S.NEW_SYN_RECV, S.FIN_WAIT2, S.LISTEN))
# What the refresh keeps of each: 31 bytes, not a whole inventory row's 80
# (a connection storm leaves hundreds of thousands of TIME_WAIT sockets).
TIME_WAIT_FIELDS = ("netns", "family", "state", "timer", "lport", "rport", "raddr")


def refresh_time_wait(sc: Scanner, rep: LeakReport, now: float) -> None:
    """TIME_WAIT per destination, its flags and the minisocket counts, from
    a dump of those states alone in the namespaces the last full scan knew
    (host-wide only: TIME_WAIT has no owner, so never under --pid).  Its
    duration, findings included, sets when the next one is due
    (``Scanner.time_wait_due``)."""
    t0 = time.perf_counter()
    try:
        _refresh_time_wait(sc, rep, now)
    finally:
        sc.time_wait_cost = time.perf_counter() - t0


def _refresh_time_wait(sc: Scanner, rep: LeakReport, now: float) -> None:
    sc.last_time_wait = now
    with (sc.session_factory or Session)(sc.refs) as sess:
        inv = sess.dump(states=TIME_WAIT_STATES, fields=TIME_WAIT_FIELDS)
    if inv.errors:
        rep.errors.extend(inv.errors)
        return  # keep the last full scan's findings rather than half of them
    rows = inv.rows
    host_ino = next((r.ino for r in sc.refs if r.label == "host"), None)
    listed, flags = time_wait_findings(rows, inv.netns, host_ino, sc.thresholds)
    sc.carried.update(flags=flags, time_wait=listed,
                      mini_states=_mini_counts(rows, np.ones(len(rows), bool)))
    rep.stats["time_wait_dump_seconds"] = round(inv.seconds, 6)


def _mini_counts(rows: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per state, the minisockets the table never holds: TIME_WAIT, request
    sockets and FIN_WAIT2 orphans (sock_diag shows those with the TIME_WAIT
    timer)."""
    mini = relevant & ((rows["state"] == int(S.TIME_WAIT)) | (rows["state"] == int(S.NEW_SYN_RECV))
                       | (rows["timer"] == sockdiag.TIMER_TIMEWAIT))
    return np.bincount(rows["state"][mini], minlength=16)[:16].astype(np.int64)


def _states(snap: Snapshot, sc: Scanner) -> dict[str, int]:
    """Sockets by state: the table's live records (counted, or seeded at
    start; CLOSE is not listed by sock_diag), plus the minisockets the
    table never holds (TIME_WAIT, request sockets, FIN_WAIT2 orphans) as
    the last full scan counted them."""
    socks = snap.socks
    live = ((socks["counted"] != 0) | ((socks["flags"] & abi.PT_F_SEEDED) != 0)) & (socks["state"] != int(S.CLOSE))
    counts = np.bincount(socks["state"][live].astype(np.intp), minlength=16)[:16]
    counts = counts + np.asarray(sc.carried.get("mini_states", np.zeros(16, np.int64)))
    return {TcpState.name_of(s): int(n) for s, n in enumerate(counts.tolist()) if n}


def carry_of(rows: np.ndarray, relevant: np.ndarray, flags: list[Any], rep: LeakReport) -> dict[str, Any]:
    """What a full scan hands the candidate scans until the next one."""
    return {
        "flags": [f for f in flags if f.kind == "time_wait_pressure"],
        "time_wait": list(rep.time_wait),
        "netns": list(rep.netns),
        "mini_states": _mini_counts(rows, relevant),
        "stats": {k: rep.stats[k] for k in ("sockets", "netns_covered", "netns_failed", "dump_seconds")
                  if k in rep.stats},
        "processes_scanned": rep.stats.get("processes_scanned"),
    }
