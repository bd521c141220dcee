"""The domain model: snapshots in, one interval report out.  Pure.

A report is a plain dict (it is also the ``--json`` line), built from the
previous and current :class:`~pytracer.table.poll.Snapshot`.  Selections over
the socket table are numpy operations; only the handful of rows that are
shown get turned into Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pytracer.format import address, family_name
from pytracer.kernel import abi
from pytracer.kernel.abi import Direction, Stat
from pytracer.kernel.histogram import Histogram
from pytracer.kernel.tcp_states import TcpState
from pytracer.table.poll import Snapshot, Totals, live_delta

CONNECTION_DIRECTIONS = (Direction.ACTIVE, Direction.PASSIVE)


@dataclass
class ReportOptions:
    pids: tuple[int, ...] = ()
    top: int = 10
    start_mono_ns: int = 0
    max_sockets: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def select(socks: np.ndarray, pids: Iterable[int] = (), connections_only: bool = False) -> np.ndarray:
    """Boolean mask over the socket table."""
    mask = np.ones(len(socks), dtype=bool)
    pids = tuple(pids)
    if pids:
        # An accepted socket has no owner in the table until an accept hook
        # names one (none by default: see pytracer.kernel.hooks); the kernel
        # kept it because its listener's process is watched.
        owner = np.where(socks["owner_tgid"] != 0, socks["owner_tgid"], socks["listener_tgid"])
        mask &= np.isin(owner, np.array(pids, dtype=np.uint32))
    if connections_only:
        mask &= socks["direction"] != int(Direction.LISTEN)
    return mask


def effective_birth(socks: np.ndarray, start_mono_ns: int) -> np.ndarray:
    """Birth times, with unknown births (0) taken as the tracer's start: the
    socket is at least that old."""
    births = socks["birth_ns"].astype(np.uint64)
    return np.where(births == 0, np.uint64(start_mono_ns), births)


def top_indices(values: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n smallest values among mask, smallest first (none for
    n <= 0: ``--top 0`` lists no sockets)."""
    if n <= 0:
        return np.zeros(0, np.intp)
    idx = np.flatnonzero(mask)
    if len(idx) <= n:
        return idx[np.argsort(values[idx], kind="stable")]
    part = idx[np.argpartition(values[idx], n - 1)[:n]]
    return part[np.argsort(values[part], kind="stable")]


def state_history(rec: np.void) -> list[str]:
    """States the socket entered, oldest first (the last PT_HISTORY)."""
    n = int(rec["transitions"])
    hist = rec["history"]
    first = max(0, n - abi.PT_HISTORY)
    return [TcpState.name_of(int(hist[i % abi.PT_HISTORY])) for i in range(first, n)]


def socket_row(key: int, rec: np.void, now_ns: int, start_mono_ns: int) -> dict[str, Any]:
    birth = int(rec["birth_ns"])
    known = birth != 0
    age_ns = now_ns - (birth if known else start_mono_ns)
    fam = int(rec["family"])
    pid = int(rec["owner_tgid"])
    return {
        "cookie": int(key),
        "pid": pid or None,
        "comm": bytes(rec["owner_comm"]).split(b"\0", 1)[0].decode(errors="replace"),
        "fd": int(rec["owner_fd"]) if int(rec["owner_fd"]) >= 0 else None,
        "state": TcpState.name_of(int(rec["state"])),
        "age_seconds": round(max(age_ns, 0) / 1e9, 6),
        "age_known": known,
        "state_age_seconds": round(max(now_ns - int(rec["state_ns"]), 0) / 1e9, 6),
        # A record seeded at start (pytracer.inventory.seed.seed) that has not changed
        # state since: state_age_seconds is "at least", counted from the seeding.
        "state_age_known": not (int(rec["flags"]) & abi.PT_F_SEEDED and int(rec["transitions"]) == 0),
        "family": family_name(fam),
        "laddr": address(fam, rec["laddr"]),
        "lport": int(rec["lport"]),
        "raddr": address(fam, rec["raddr"]),
        "rport": int(rec["rport"]),
        "direction": Direction(int(rec["direction"]) & 3).name.lower(),
        "transitions": int(rec["transitions"]),
        "history": state_history(rec),
        "listener_pid": int(rec["listener_tgid"]) or None,
        "accepted": bool(rec["accepted"]),
        "app_closed": bool(rec["app_closed"]),
        "closer_pid": int(rec["closer_tgid"]) or None,
        "inode": int(rec["ino"]) or None,
        "netns": int(rec["netns_ino"]),
        "cgroup_id": int(rec["cgroup_id"]) or None,
        "peer_closed_first": bool(int(rec["flags"]) & abi.PT_F_PEER_FIN),
        "reset": bool(int(rec["flags"]) & abi.PT_F_RESET),
    }


def _delta(cur: Totals, prev: Totals | None, s: Stat, offset: int = 0) -> int:
    return cur.stat(s, offset) - (prev.stat(s, offset) if prev else 0)


def lifetime_all(t: Totals) -> Histogram:
    h = Histogram.empty()
    for d in CONNECTION_DIRECTIONS:
        h = h + t.lifetime(d)
    return h


def histogram_json(h: Histogram) -> list[dict[str, Any]]:
    return [
        {"le_seconds": ("+Inf" if le == float("inf") else round(le, 6)), "count": n} for le, n in h.cumulative()
    ]


def summary(h: Histogram) -> dict[str, Any]:
    return {
        "count": h.count,
        "sum_seconds": round(h.sum_us / 1e6, 6),
        "p50_seconds": _r(h.quantile(0.5)),
        "p90_seconds": _r(h.quantile(0.9)),
        "p99_seconds": _r(h.quantile(0.99)),
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


@dataclass
class TableView:
    """What a report takes from one read of the socket table: the work
    proportional to the table, done once per read (see
    pytracer.table.poll.TablePoller), whatever the number of reports."""

    table_mono_ns: int
    counts: np.ndarray  # live records per state, --pid applied
    tracked: int  # connections (not listeners), --pid applied
    longest_lived: np.ndarray  # table indices, oldest first
    longest_in_state: np.ndarray


def table_view(cur: Snapshot, opts: ReportOptions) -> TableView:
    """The view of a table read whole: :class:`ViewReducer` over it as one chunk."""
    r = ViewReducer(opts)
    r.add(0, cur.keys, cur.socks)
    return r.finish(cur.table_mono_ns)


def _top_merge(best: tuple[np.ndarray, np.ndarray], values: np.ndarray, mask: np.ndarray, first: int,
               n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, table indices) of the ``n`` smallest so far, with a chunk's
    (rows ``first`` on) added: the chunk's own top ``n`` only."""
    idx = top_indices(values, mask, n)
    vals = np.concatenate([best[0], values[idx]])
    at = np.concatenate([best[1], idx + first])
    keep = top_indices(vals, np.ones(len(vals), bool), n)  # earlier rows first among ties
    return vals[keep], at[keep]


class ViewReducer:
    """:func:`table_view`, a chunk of whole records at a time, as a
    :class:`~pytracer.table.poll.TablePoller` reads the table (its
    ``reducer``): the view's counts and top-N lists without keeping the
    columns they read (birth, owner, listener, direction) for every record.
    The table kept is then only what the leak scans compare."""

    def __init__(self, opts: ReportOptions) -> None:
        self.opts = opts
        self.start()

    def start(self) -> None:
        empty = (np.zeros(0, np.uint64), np.zeros(0, np.intp))
        self.counts = np.zeros(abi.PT_STATES, np.int64)
        self.tracked = 0
        self._lived, self._in_state = empty, empty

    def add(self, first: int, keys: np.ndarray, recs: np.ndarray) -> None:
        opts = self.opts
        # States come from the socket table itself (it includes sockets seeded at
        # start); --pid applies.  TIME_WAIT minisockets are not in the table: an
        # inventory (sock_diag) adds them when available (the leak enricher).
        chosen = select(recs, opts.pids)
        self.counts += np.bincount(recs["state"][chosen], minlength=abi.PT_STATES)[: abi.PT_STATES]
        conn = chosen & (recs["direction"] != int(Direction.LISTEN))
        self.tracked += int(conn.sum())
        self._lived = _top_merge(self._lived, effective_birth(recs, opts.start_mono_ns), conn, first, opts.top)
        self._in_state = _top_merge(self._in_state, recs["state_ns"].astype(np.uint64), conn, first, opts.top)

    def finish(self, table_mono_ns: int) -> TableView:
        return TableView(table_mono_ns, self.counts, self.tracked, self._lived[1], self._in_state[1])


def build_report(cur: Snapshot, prev: Snapshot | None, opts: ReportOptions,
                 view: TableView | None = None) -> dict[str, Any]:
    """One interval's report.  ``view``: :func:`table_view` of ``cur``'s
    table, when the caller keeps it across reports on the same table; else
    the one its reader reduced as it read it (``cur.reduced``), if any."""
    t, p = cur.totals, (prev.totals if prev else None)
    interval = (cur.mono_ns - prev.mono_ns) / 1e9 if prev else (cur.mono_ns - opts.start_mono_ns) / 1e9
    interval = max(interval, 1e-9)
    opened = sum(_delta(t, p, Stat.OPENED, int(d)) for d in CONNECTION_DIRECTIONS)
    closed = sum(_delta(t, p, Stat.CLOSED, int(d)) for d in CONNECTION_DIRECTIONS)

    socks, keys = cur.socks, cur.keys
    if view is None or view.table_mono_ns != cur.table_mono_ns:
        if isinstance(cur.reduced, TableView):
            view = cur.reduced
        elif "owner_tgid" not in (cur.socks.dtype.names or ()):
            raise ValueError("a narrow table has no view of its own: read it with a ViewReducer "
                             "(snapshot(..., narrow=True, reducer=ViewReducer(opts)))")
        else:
            view = table_view(cur, opts)
    longest_lived, longest_in_state = view.longest_lived, view.longest_in_state
    shown = list(dict.fromkeys([*longest_lived.tolist(), *longest_in_state.tolist()]))
    # Whole records of the shown sockets only (the table may hold a narrow
    # projection); a socket gone since the table was read is not shown.
    recs = {i: cur.record(i) for i in shown}
    rows = {i: socket_row(int(keys[i]), rec, cur.mono_ns, opts.start_mono_ns) for i, rec in recs.items()
            if rec is not None}

    counts = view.counts
    if cur.table_totals is not None and cur.table_totals is not t:
        # An older table (see pytracer.table.poll.TablePoller): its counts
        # plus what the kernel counted entering and leaving each state since.
        counts = np.maximum(counts.astype(np.int64) + live_delta(t, cur.table_totals), 0)
    states = {TcpState.name_of(s): int(n) for s, n in enumerate(counts) if n}
    life = lifetime_all(t)
    report: dict[str, Any] = {
        "ts": round(cur.wall, 3),
        "interval_seconds": round(interval, 3),
        "states": states,
        "opened": opened,
        "closed": closed,
        "opened_per_second": round(opened / interval, 2),
        "closed_per_second": round(closed / interval, 2),
        "opened_total": sum(t.stat(Stat.OPENED, int(d)) for d in CONNECTION_DIRECTIONS),
        "closed_total": sum(t.stat(Stat.CLOSED, int(d)) for d in CONNECTION_DIRECTIONS),
        "lifetime_histogram": histogram_json(life),
        "lifetime": {
            "all": summary(life),
            **{d.name.lower(): summary(t.lifetime(d)) for d in CONNECTION_DIRECTIONS},
        },
        "tracked_sockets": view.tracked,
        "sockets": [rows[i] for i in shown if i in rows],
        "longest_lived": [int(keys[i]) for i in longest_lived if i in rows],
        "longest_in_state": [int(keys[i]) for i in longest_in_state if i in rows],
        "tracer": {
            "map_entries": int(len(socks)),
            "map_capacity": opts.max_sockets,
            "insert_failed": t.stat(Stat.INSERT_FAILED),
            "first_seen_midlife": t.stat(Stat.MIDLIFE),
            "accept_untracked": t.stat(Stat.ACCEPT_UNTRACKED),
            "read_seconds": round(cur.read_seconds, 6),
            "table_age_seconds": round(cur.table_age_seconds, 3),
            **opts.extra,
        },
    }
    return report
