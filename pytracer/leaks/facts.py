"""The joins a leak scan makes, row by row of the sock_diag inventory.

:class:`pytracer.leaks.scanner.Scanner` gathers its sources; this module
joins them, vectorized over the inventory rows:

* :func:`join_table`: exact time in state (or a lower bound for seeded
  records) and "accepted" from the BPF socket table (:class:`TableTimes`);
* :class:`History`: what the Scanner remembers per socket between scans;
* :func:`candidates`: which sockets may be flagged, and which to ask
  tcp_info about;
* :func:`sock_facts`: one :class:`~pytracer.leaks.detectors.SockFacts` per
  candidate, with its owners, listener and kernel floors, for the detectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pytracer.arrays import find_sorted, is_sorted
from pytracer.format import address
from pytracer.inventory import procs, sockdiag
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel import abi
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import SockFacts, Thresholds, combine_state_time, kernel_state_floor
from pytracer.table.poll import Snapshot

S = TcpState
# States whose sockets the detectors look at one by one.
STUCK_STATES = (S.CLOSE_WAIT, S.LAST_ACK, S.FIN_WAIT2)

# Per-socket history a Scanner carries between scans, one array each,
# aligned with the sorted cookies (see History.carry).  Monotonic seconds:
# since when the socket has been seen in its state; when it could be idle
# for idle_after at the earliest (-inf: never asked, due now); when the
# state began at the latest, by the largest kernel floor measured (now -
# floor when measured).
_HISTORY = (("since", np.nan), ("not_before", -np.inf), ("floor_began", np.nan))
HISTORY_TIMES = tuple(name for name, _ in _HISTORY)  # the kept times' names, for whoever hands over pieces
# Kept as float32 seconds from the History's epoch (its first scan): 4 bytes
# a time instead of 8.  A float32 resolves 4 ms at 9 hours from the epoch and
# 1 s at 194 days, far finer than any threshold a time is compared with.
_KEPT = np.float32

# Rows a step that runs over every candidate takes at a time.
FACTS_CHUNK = 8192

# (netns, port) -> [(laddr raw, family, holders, (queued, limit))]
Listeners = dict[tuple[int, int], list]


class Carried:
    """The history aligned with one scan's rows (:meth:`History.carry`),
    kept as the History keeps it: float32 seconds from ``epoch``, 12 bytes
    a row instead of 24 (a full scan holds it for every socket until its
    store).  Times go in and out as float64 monotonic seconds; the store
    and the merge take the arrays as they are."""

    def __init__(self, kept: dict[str, np.ndarray], epoch: float) -> None:
        self.kept = kept
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.kept["since"])

    def at(self, name: str, idx: Any = slice(None)) -> np.ndarray:
        """Monotonic seconds of ``name`` for the rows ``idx``."""
        return self.kept[name][idx].astype(np.float64) + self.epoch

    def put(self, name: str, idx: Any, times: Any) -> None:
        """Set ``name`` of the rows ``idx`` to ``times`` (monotonic seconds)."""
        self.kept[name][idx] = np.asarray(times, np.float64) - self.epoch

    def offset(self, now: float) -> np.float32:
        """``now`` as the kept times are: a time put at ``now`` reads as
        this, so "put at now" and "now" compare equal."""
        return _KEPT(now - self.epoch)

    def due(self, name: str, now: float) -> np.ndarray:
        """Whether ``name`` is at or before ``now``, for every row (compared
        as kept: no float64 copy of the column)."""
        return self.kept[name] <= self.offset(now)


class History:
    """Per-socket memory between scans, in numpy arrays sorted by cookie:
    since when it has been seen in its current state, when its state began
    at the latest by the largest kernel floor measured, and, for ESTABLISHED
    sockets, the earliest time it could possibly be idle for
    ``idle_after`` (so tcp_info is not asked again before then).  Times are
    kept as float32 offsets from ``epoch`` (the ``now`` of the first
    :meth:`carry`), and handed to a scan as they are (:class:`Carried`)."""

    def __init__(self) -> None:
        self._cookie = np.zeros(0, np.uint64)
        self._state = np.zeros(0, np.uint8)
        self._hist: dict[str, np.ndarray] = {name: np.zeros(0, _KEPT) for name, _ in _HISTORY}
        self.epoch: float | None = None

    @property
    def cookies(self) -> np.ndarray:
        """The sorted cookies the history is kept for (read-only)."""
        return self._cookie

    def carry(self, rows: np.ndarray, now: float) -> Carried:
        """History aligned with ``rows``: carried over for sockets still in the
        state they were in last scan, fresh otherwise."""
        if self.epoch is None:
            self.epoch = float(now)
        n = len(rows)
        out = Carried({name: np.full(n, default, _KEPT) for name, default in _HISTORY}, self.epoch)
        out.kept["since"][:] = out.offset(now)
        if len(self._cookie) and n:
            pos, hit = find_sorted(self._cookie, rows["cookie"])
            same = np.flatnonzero(hit & (self._state[pos] == rows["state"]))
            pos = pos[same]
            for name, _ in _HISTORY:
                out.kept[name][same] = self._hist[name][pos]
            del pos, same
        return out

    def store_parts(self, parts: dict[str, list[np.ndarray]]) -> np.ndarray:
        """Replace the whole history with the rows of ``parts`` (per column,
        "cookie", "state" and each kept time, the pieces of a full scan's
        rows taken as they came, not in cookie order), sorted by cookie.
        Each column is joined and put in order on its own, its pieces let go
        of first (``parts`` is emptied), and the old history before any:
        beside the pieces, one column and the order are held.  Returns the
        order (indices into the joined pieces), for a column kept beside the
        history."""
        # The old history goes first (its scan has carried it).
        self._cookie, self._state = np.zeros(0, np.uint64), np.zeros(0, np.uint8)
        self._hist = {name: np.zeros(0, _KEPT) for name, _ in _HISTORY}
        cookie = np.concatenate(parts.pop("cookie")) if parts.get("cookie") else np.zeros(0, np.uint64)
        order = np.argsort(cookie, kind="stable")
        if len(cookie) < 2**32:
            order = order.astype(np.uint32)  # the 8-byte order goes: 4 bytes a row are held from here
        self._cookie = cookie[order]
        del cookie
        state = np.concatenate(parts.pop("state")) if parts.get("state") else np.zeros(0, np.uint8)
        self._state = state[order]
        del state
        for name, _ in _HISTORY:
            col = np.concatenate(parts.pop(name)) if parts.get(name) else np.zeros(0, _KEPT)
            self._hist[name] = col[order]
            del col
        return order

    def due_rechecks(self, now: float, skip: np.ndarray | None = None) -> np.ndarray:
        """Cookies (ascending) of the ESTABLISHED sockets whose next check has
        come: tcp_info said when each could be idle for ``idle_after`` at the
        earliest (``not_before``; never asked: -inf, not a recheck), and that
        time is past.  ``skip``: sorted cookies left out (asked since, and
        not answered).  The candidate scans take their rechecks from here:
        the times are kept once, not again in a list beside them.  A few
        compares over the kept arrays, no copy of them."""
        if self.epoch is None or not len(self._cookie):
            return np.zeros(0, np.uint64)
        nb = self._hist["not_before"]
        due = (nb <= _KEPT(now - self.epoch)) & (nb > -np.inf) & (self._state == int(S.ESTABLISHED))
        out = self._cookie[due]
        if skip is not None and len(skip) and len(out):
            out = out[~find_sorted(skip, out)[1]]
        return out

    def merge(self, rows: np.ndarray, hist: Carried) -> None:
        """Update the history of ``rows`` only (a candidate scan's few
        sockets), keeping everyone else's: O(len(rows) log n), plus one
        copy of the arrays when a socket is new to the history.  ``hist``
        comes from :meth:`carry`."""
        if not len(rows):
            return
        order = np.argsort(rows["cookie"], kind="stable")
        cookie, state = rows["cookie"][order], rows["state"][order]
        kept = {name: hist.kept[name][order] for name, _ in _HISTORY}
        pos = np.searchsorted(self._cookie, cookie)
        hit = np.zeros(len(cookie), bool)
        if len(self._cookie):
            hit = self._cookie[np.minimum(pos, len(self._cookie) - 1)] == cookie
        at = pos[hit]
        self._state[at] = state[hit]
        for name, _ in _HISTORY:
            self._hist[name][at] = kept[name][hit]
        new = ~hit
        if new.any():
            at = pos[new]
            self._cookie = np.insert(self._cookie, at, cookie[new])
            self._state = np.insert(self._state, at, state[new])
            for name, _ in _HISTORY:
                self._hist[name] = np.insert(self._hist[name], at, kept[name][new])

    def store(self, rows: np.ndarray, hist: Carried, keep: np.ndarray | None = None) -> None:
        """Replace the whole history with ``hist`` (from :meth:`carry`),
        aligned with ``rows`` (a full scan's every socket), or with the rows
        ``keep`` (a mask) only.  Rows in cookie order, every one kept: the
        carried arrays themselves become the history (they are the
        caller's no longer).  Otherwise the old arrays go before the new
        ones are made, one at a time, so the two are not held whole at
        once."""
        cookie = rows["cookie"]
        sel: Any = slice(None) if keep is None or keep.all() else np.flatnonzero(keep)
        order = None if is_sorted(cookie) else np.argsort(cookie[sel], kind="stable")
        pick = sel if order is None else (order if isinstance(sel, slice) else sel[order])
        self._cookie, self._state = cookie[pick], rows["state"][pick]
        if isinstance(pick, slice):  # views of the caller's rows
            self._cookie, self._state = self._cookie.copy(), self._state.copy()
        for name, _ in _HISTORY:
            self._hist[name] = np.zeros(0, _KEPT)
            self._hist[name] = hist.kept[name] if isinstance(pick, slice) else hist.kept[name][pick]


def seen(hist: Carried, idx: Any, now: float) -> np.ndarray:
    """Seconds the sockets ``idx`` have been seen in their state (NaN at the
    first sighting, which proves nothing).  Derived where needed, not kept
    for every socket."""
    since = hist.kept["since"][idx]
    return np.where(since < hist.offset(now), now - (since.astype(np.float64) + hist.epoch), np.nan)


def floor_now(hist: Carried, idx: Any, now: float) -> np.ndarray:
    """The largest kernel floor on the time in state of the sockets ``idx``,
    grown by the time since it was measured (NaN: none)."""
    return now - hist.at("floor_began", idx)


def remembered(rows: np.ndarray) -> np.ndarray:
    """The rows a History keeps between scans: every socket but TIME_WAIT
    and request minisockets, which no detector judges one by one (a host
    in a connection storm holds hundreds of thousands of them)."""
    return (rows["state"] != int(S.TIME_WAIT)) & (rows["state"] != int(S.NEW_SYN_RECV))


def sort_by_cookie(rows: np.ndarray) -> np.ndarray:
    """``rows`` (INV_DTYPE) reordered by cookie, in place, one field at a
    time: the transient is one field's copy, not a second table (a
    read-only array is copied first)."""
    if is_sorted(rows["cookie"]):
        return rows
    order = np.argsort(rows["cookie"], kind="stable")
    if not rows.flags.writeable:
        rows = rows.copy()
    for name in rows.dtype.names:
        rows[name] = rows[name][order]
    return rows


def listeners(rows: np.ndarray, owners: procs.SocketOwners) -> Listeners:
    """(netns, port) -> [(laddr raw, family, holders, (queued, limit))]."""
    out: Listeners = {}
    for i in np.flatnonzero(rows["state"] == int(S.LISTEN)).tolist():
        r = rows[i]
        out.setdefault((int(r["netns"]), int(r["lport"])), []).append(
            (bytes(r["laddr"]), int(r["family"]), owners.get(int(r["inode"]), []),
             (int(r["rqueue"]), int(r["wqueue"])))
        )
    return out


def listener_of(lst: Listeners, netns: int, lport: int, laddr: bytes, family: int) -> tuple | None:
    """The listener a socket on (netns, lport, laddr) was queued on: the one
    bound to its address, else a wildcard one."""
    best = None
    for addr, fam, holders, q in lst.get((netns, lport), []):
        if addr == laddr and fam == family:
            return addr, fam, holders, q
        if not addr.strip(b"\0"):
            best = best or (addr, fam, holders, q)
    return best


@dataclass
class TableTimes:
    """What the socket table says of each inventory row (:func:`join_table`):
    seconds in the row's state (NaN: no record, or one in another state),
    whether that is only a lower bound (a seeded record no transition has
    touched: the state began before the record was put in), and accepted
    (-1 unknown).  An exact time and a bound are never both known for a row,
    so they share one column: 10 bytes a row, not 18."""

    age: np.ndarray  # float64 seconds
    seeded: np.ndarray  # bool: ``age`` is a bound, not exact
    accepted: np.ndarray  # int8
    matched: int = 0  # rows the table has a record for

    @classmethod
    def of(cls, exact: np.ndarray, bound: np.ndarray, accepted: np.ndarray) -> TableTimes:
        """From an exact and a bound column, at most one of them known per row."""
        seeded = np.isnan(exact) & ~np.isnan(bound)
        return cls(np.where(seeded, bound, exact), seeded, np.asarray(accepted, np.int8))

    def exact(self, idx: Any = slice(None)) -> np.ndarray:
        """Exact seconds in state of the rows ``idx`` (NaN: not known)."""
        return np.where(self.seeded[idx], np.nan, self.age[idx])

    def bound(self, idx: Any = slice(None)) -> np.ndarray:
        """Seconds since a seeded record of the rows ``idx`` was put in (NaN: none)."""
        return np.where(self.seeded[idx], self.age[idx], np.nan)

    def younger_than(self, seconds: float) -> np.ndarray:
        """Per row: known exactly to be in its state for less than ``seconds``."""
        return ~self.seeded & (self.age < seconds)  # NaN compares False


class TableIndex:
    """The socket table's keys sorted, and their order (uint32): what a
    join searches.  Made once for a scan that joins many parts of its rows
    (a datagram at a time), not once a part."""

    def __init__(self, snap: Snapshot) -> None:
        self.order = np.argsort(snap.keys, kind="stable").astype(np.uint32 if len(snap.keys) < 2**32 else np.intp)
        self.keys = snap.keys[self.order]


def join_table(rows: np.ndarray, snap: Snapshot | None, now_ns: int, key_by_ptr: bool,
               index: TableIndex | None = None) -> TableTimes:
    """Per inventory row, what the socket table says (:class:`TableTimes`).
    :data:`FACTS_CHUNK` rows at a time: beside the answers, only the
    table's sorted keys are held whole (``index``: made already, for
    ``snap``)."""
    n = len(rows)
    out = TableTimes(np.full(n, np.nan), np.zeros(n, bool), np.full(n, -1, dtype=np.int8))
    if snap is None or not len(snap.keys) or key_by_ptr or not n:
        return out
    index = index or TableIndex(snap)
    order, keys = index.order, index.keys
    socks = snap.socks
    for start in range(0, n, FACTS_CHUNK):
        part = slice(start, start + FACTS_CHUNK)
        pos, hit = find_sorted(keys, rows["cookie"][part])
        idx = order[pos]
        same = hit & (socks["state"][idx] == rows["state"][part])
        untouched = ((socks["flags"][idx] & abi.PT_F_SEEDED) != 0) & (socks["transitions"][idx] == 0)
        age = np.maximum((np.int64(now_ns) - socks["state_ns"][idx].astype(np.int64)) / 1e9, 0.0)
        out.age[part] = np.where(same, age, np.nan)
        out.seeded[part] = same & untouched
        out.accepted[part] = np.where(hit, socks["accepted"][idx].astype(np.int8), -1)
        out.matched += int(hit.sum())
    return out


def candidates(th: Thresholds, rows: np.ndarray, relevant: np.ndarray, times: TableTimes,
               hist: Carried, fin_timeout: dict[int, int | None], now: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stuck-state rows to judge, ESTABLISHED rows to judge, rows to ask
    tcp_info for).  Vectorized; the stuck states' arithmetic runs over
    their rows only, not every socket's."""
    state = rows["state"]
    stuck = np.flatnonzero(relevant & np.isin(state, [int(s) for s in STUCK_STATES]))
    st = state[stuck]
    is_tw = rows["timer"][stuck] == sockdiag.TIMER_TIMEWAIT
    ns_fin = np.full(len(stuck), np.nan)
    if len(stuck):
        netns = rows["netns"][stuck]
        for ino, ft in fin_timeout.items():
            if ft is not None:
                ns_fin[netns == ino] = ft

    # Stuck states: every one is a candidate unless known to be young.
    thr = np.full(len(stuck), np.inf)
    thr[st == int(S.CLOSE_WAIT)] = th.close_wait_after
    thr[st == int(S.LAST_ACK)] = th.last_ack_after
    fw2 = st == int(S.FIN_WAIT2)
    thr[fw2] = th.fin_wait2_after if th.fin_wait2_after is not None else np.where(np.isnan(ns_fin), np.inf,
                                                                                   ns_fin)[fw2]
    ex = times.exact(stuck)
    young = ~np.isnan(ex) & (ex < thr)
    # FIN_WAIT2 orphans in timewait: the timer was armed with fin_timeout,
    # so fin_timeout - remaining is how long they have waited.
    waited = np.where(is_tw, ns_fin - rows["expires_ms"][stuck] / 1000.0, np.nan)
    young |= is_tw & ~(waited >= thr)
    old = ~young
    stuck, is_tw, thr, ex = stuck[old], is_tw[old], thr[old], ex[old]
    floors = floor_now(hist, stuck, now)
    bound = np.fmax(np.fmax(times.bound(stuck), seen(hist, stuck, now)), floors)
    # Ask tcp_info when the socket may be flagged (the idle clocks are
    # evidence) or no kernel floor is known yet; minisockets have none.
    ask_stuck = stuck[~is_tw & (~np.isnan(ex) | np.isnan(floors) | (bound >= thr))]

    q_est = established_candidates(th, rows, relevant, times, hist, now)
    # In row order: a full scan's rows are sorted by cookie, so the cookies
    # asked for are too (a tcp_info dump then needs no sorted copy of them).
    query = np.sort(np.concatenate([ask_stuck, q_est]).astype(np.intp)) if len(ask_stuck) else q_est
    return stuck.astype(np.intp, copy=False), q_est.astype(np.intp, copy=False), query  # query may be q_est itself


def established_candidates(th: Thresholds, rows: np.ndarray, relevant: np.ndarray, times: TableTimes,
                           hist: Carried, now: float) -> np.ndarray:
    """ESTABLISHED rows that may be idle for ``idle_after``: every one in
    scope unless known to be younger than that, or checked recently enough
    that it cannot be idle yet (row indices, ascending).  All a full scan's
    walk of the ESTABLISHED sockets asks of each datagram (no stuck states
    there)."""
    est = relevant & (rows["state"] == int(S.ESTABLISHED)) & ~times.younger_than(th.idle_after)
    est &= hist.due("not_before", now)
    return np.flatnonzero(est)


def sock_facts(rows: np.ndarray, stuck_idx: np.ndarray, est_idx: np.ndarray, times: TableTimes, hist: Carried,
               infos: TcpInfoTable, owners: procs.SocketOwners, lst: Listeners,
               fin_timeout: dict[int, int | None], now: float, idle_after: float, max_facts: int,
               errors: list[Any], recheck_s: float = 0.0) -> list[SockFacts]:
    """The facts of the stuck candidates, then of the ESTABLISHED ones idle
    for ``idle_after`` (at most ``max_facts``; the cut is noted in ``errors``).
    Updates ``hist`` (kernel floors, when an ESTABLISHED one may be idle)."""
    idx = stuck_idx.tolist() + idle_among(rows, est_idx, hist, infos, now, idle_after).tolist()  # stuck first
    if len(idx) > max_facts:
        errors.append(not_judged(len(idx), max_facts))
        idx = idx[:max_facts]
    judged_idle(hist, np.asarray(idx[len(stuck_idx):], np.intp), now, recheck_s)
    return judge(rows, idx, times, hist, infos, owners, lst, fin_timeout, now)


def not_judged(found: int, max_facts: int) -> str:
    """The error a scan notes when more sockets look flagged than it judges."""
    return f"{found - max_facts} flagged-looking sockets not judged this scan (more than {max_facts})"


def idle_among(rows: np.ndarray, est_idx: np.ndarray, hist: Carried, infos: TcpInfoTable, now: float,
               idle_after: float) -> np.ndarray:
    """The ESTABLISHED candidates ``est_idx`` that tcp_info says are idle
    for ``idle_after`` (row indices, in order).  Every one answered learns
    when it could be idle at the earliest (``not_before`` in ``hist``); only
    the idle ones become objects.  A chunk at a time: at the first scan
    every seeded ESTABLISHED socket is here."""
    idle_idx: list[np.ndarray] = [np.zeros(0, np.intp)]
    for start in range(0, len(est_idx), FACTS_CHUNK):
        part = est_idx[start : start + FACTS_CHUNK]
        found, idle_ms = infos.idle_ms(rows["cookie"][part])
        answered = part[found]
        idle = idle_ms[found] / 1000
        hist.put("not_before", answered, now + np.maximum(0.0, idle_after - idle))
        idle_idx.append(answered[idle >= idle_after].astype(np.intp, copy=False))
    return np.concatenate(idle_idx)


def judged_idle(hist: Carried, idx: np.ndarray, now: float, recheck_s: float) -> None:
    """The idle ones judged (row indices ``idx``) are measured again
    ``recheck_s`` later; their flags are carried until then
    (pytracer.leaks.idle_carry)."""
    hist.put("not_before", idx, now + recheck_s)


def judge(rows: np.ndarray, idx: list[int], times: TableTimes, hist: Carried, infos: TcpInfoTable,
          owners: procs.SocketOwners, lst: Listeners, fin_timeout: dict[int, int | None], now: float
          ) -> list[SockFacts]:
    """One :class:`~pytracer.leaks.detectors.SockFacts` per row of ``idx``,
    with its owners, listener and kernel floors.  Updates ``hist`` (kernel
    floors)."""
    out = []
    held = owners.get_many(rows["inode"][np.asarray(idx, np.intp)]) if idx else []
    for k, i in enumerate(idx):
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
        grown = float(floor_now(hist, i, now))
        if floor is not None:
            grown = floor if np.isnan(grown) else max(floor, grown)
            hist.put("floor_began", i, now - grown)
        exact = float(times.exact(i))
        seen_bounds = [float(x) for x in (times.bound(i), seen(hist, i, now)) if not np.isnan(x)]
        secs, is_exact = combine_state_time(None if np.isnan(exact) else exact,
                                            max(seen_bounds) if seen_bounds else None,
                                            None if np.isnan(grown) else grown)
        inode = int(r["inode"])
        f = SockFacts(
            cookie=cookie, netns=int(r["netns"]), family=fam, state=state_name,
            laddr=address(fam, r["laddr"]), lport=int(r["lport"]), raddr=address(fam, r["raddr"]),
            rport=int(r["rport"]), inode=inode, timer=int(r["timer"]),
            expires_seconds=int(r["expires_ms"]) / 1000, owners=held[k] if inode else [],
            state_seconds=secs, state_exact=is_exact, fin_timeout=ft,
            accepted=None if times.accepted[i] < 0 else bool(times.accepted[i]),
        )
        if info is not None:
            f.idle_seconds = info.idle_ms / 1000
            f.last_ack_recv_seconds = info.last_ack_recv_ms / 1000
            f.retransmits, f.backoff, f.rto_seconds = info.retransmits, info.backoff, info.rto_us / 1e6
        if inode == 0:
            found_lst = listener_of(lst, f.netns, f.lport, bytes(r["laddr"]), fam)
            if found_lst is not None:
                f.listener_owners = list(found_lst[2])
                f.listener_backlog = found_lst[3]
        out.append(f)
    return out
