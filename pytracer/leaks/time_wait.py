"""TIME_WAIT pressure: TIME_WAIT sockets per destination against the
namespace's ephemeral port range, and the flag when one destination holds
too much of it ("Cannot assign requested address" next).  Pure: rows of the
sock_diag inventory in, destinations and flags out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from pytracer.format import address, endpoint, family_name
from pytracer.leaks.detectors import Flag
from pytracer.leaks.thresholds import Thresholds


@dataclass
class TimeWaitDest:
    netns: int
    raddr: str
    rport: int
    family: int
    count: int  # TIME_WAIT sockets to it with a local port in the ephemeral range
    range_size: int | None  # the namespace's ip_local_port_range size
    host_netns: bool = True

    @property
    def dest(self) -> str:
        d = endpoint(self.raddr, self.rport)
        return d if self.host_netns else f"{d}@netns:{self.netns}"


def time_wait_by_destination(rows: np.ndarray, port_ranges: Mapping[int, tuple[int, int] | None],
                             host_netns: int | None = None, top: int | None = None,
                             warn_ratio: float | None = None) -> list[TimeWaitDest]:
    """Count TIME_WAIT sockets per (namespace, destination address and port),
    keeping only those whose local port is in that namespace's ephemeral
    range and is not a port something listens on: those are connect()s from
    here, using up local ports.  (The server side of a connection it closed
    first holds TIME_WAIT on its listening port, which costs no ephemeral
    port, and a listener bound to port 0 gets one from the same range.)

    Returns the ``top`` busiest destinations plus every one at or above
    ``warn_ratio`` of its range (all of them when both are None), busiest
    first.  ``rows`` needs the inventory fields netns, state, family, lport,
    raddr and rport.
    """
    st = rows["state"]
    at = np.flatnonzero(st == 6)
    if not len(at):
        return []
    # Only the TIME_WAIT rows from here on (a storm leaves hundreds of
    # thousands), one namespace without a search for the others.
    ns_at, lport = rows["netns"][at], rows["lport"][at]
    keep = np.ones(len(at), dtype=bool)
    single = _one(ns_at)
    for ns in [int(ns_at[0])] if single else np.unique(ns_at).tolist():
        pr = port_ranges.get(ns)
        if pr is not None:
            in_range = (lport >= pr[0]) & (lport <= pr[1])
            keep &= in_range if single else (ns_at != ns) | in_range
    lst = np.flatnonzero(st == 10)
    if len(lst):
        listening = rows["netns"][lst].astype(np.uint64) * np.uint64(65536) + rows["lport"][lst].astype(np.uint64)
        sub = np.flatnonzero(keep)
        key = ns_at[sub].astype(np.uint64) * np.uint64(65536) + lport[sub].astype(np.uint64)
        keep[sub[np.isin(key, listening)]] = False
    at = at[keep]
    if not len(at):
        return []
    first, counts = _group(rows["netns"][at], rows["family"][at], rows["raddr"][at], rows["rport"][at])
    first = at[first]
    group_ns = rows["netns"][first]
    sizes = np.zeros(len(first), dtype=np.float64)
    for ns in np.unique(group_ns).tolist():
        pr = port_ranges.get(int(ns))
        if pr:
            sizes[group_ns == ns] = pr[1] - pr[0] + 1
    pick = np.zeros(len(first), dtype=bool)
    if top is None and warn_ratio is None:
        pick[:] = True
    if top:
        pick[np.argsort(-counts, kind="stable")[:top]] = True
    if warn_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            pick |= (sizes > 0) & (counts / np.where(sizes > 0, sizes, 1) >= warn_ratio)
    out = []
    for g in np.flatnonzero(pick).tolist():
        r = rows[first[g]]
        fam = int(r["family"])
        ns = int(r["netns"])
        out.append(
            TimeWaitDest(
                netns=ns,
                raddr=address(fam, r["raddr"], unmap=True),
                rport=int(r["rport"]),
                family=fam,
                count=int(counts[g]),
                range_size=int(sizes[g]) or None,
                host_netns=host_netns is None or ns == host_netns,
            )
        )
    out.sort(key=lambda d: (-d.count, d.dest))
    return out


def _one(a: np.ndarray) -> bool:
    """Whether every value of (non-empty) ``a`` is its first."""
    return bool(a.min() == a.max())


def _mix(netns: np.ndarray, family: np.ndarray, words: np.ndarray, rport: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each row's destination key (wrapping arithmetic)."""
    h = netns.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for col in (family.astype(np.uint64) << np.uint64(16) | rport.astype(np.uint64), *words.T):
        h ^= col + np.uint64(0x632BE59BD9B4E227) + (h << np.uint64(6)) + (h >> np.uint64(2))
    return h


def _group(netns: np.ndarray, family: np.ndarray, raddr: np.ndarray, rport: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """(index of each group's first row, rows in the group) of the rows'
    (netns, family, raddr, rport), in key order.  Sorted on a 64-bit mix of
    the key, then every row checked against its group's first: a collision
    (never seen; it would take two destinations with the same mix) falls
    back to sorting the whole keys.  One destination (a storm's usual
    case) is found by comparing the rows with the first: no sort."""
    n = len(netns)
    if n and _one(netns) and _one(family) and _one(rport):
        halves = np.ascontiguousarray(raddr).view(np.uint64).reshape(n, 2)
        if _one(halves[:, 0]) and _one(halves[:, 1]):
            return np.zeros(1, np.intp), np.array([n], np.intp)
    words = np.ascontiguousarray(raddr).view(">u4").reshape(n, 4).astype(np.uint64)  # byte order: sorts as bytes
    _, first, inverse, counts = np.unique(_mix(netns, family, words, rport), return_index=True,
                                          return_inverse=True, return_counts=True)
    rep = first[inverse]
    if (np.array_equal(netns, netns[rep]) and np.array_equal(family, family[rep])
            and np.array_equal(rport, rport[rep]) and np.array_equal(raddr, raddr[rep])):
        order = np.lexsort((rport[first], *(words[first].T[::-1]), family[first], netns[first]))
        return first[order], counts[order]
    m = np.empty((n, 27), np.uint8)
    m[:, :8] = netns.astype(">u8").view(np.uint8).reshape(n, 8)
    m[:, 8] = family
    m[:, 9:25] = raddr
    m[:, 25:27] = rport.astype(">u2").view(np.uint8).reshape(n, 2)
    _, first, counts = np.unique(m.view("V27").ravel(), return_index=True, return_counts=True)
    return first, counts


def time_wait_flags(dests: Iterable[TimeWaitDest], th: Thresholds, tw_reuse: Mapping[int, int | None] | None = None
                    ) -> list[Flag]:
    out = []
    for d in dests:
        if not d.range_size:
            continue
        ratio = d.count / d.range_size
        if ratio < th.time_wait_warn_ratio:
            continue
        reuse = (tw_reuse or {}).get(d.netns)
        out.append(
            Flag(
                kind="time_wait_pressure",
                state="TIME_WAIT",
                raddr=d.raddr,
                rport=d.rport,
                family=family_name(d.family),
                netns=d.netns,
                detail=(
                    f"{d.count} TIME_WAIT sockets to {endpoint(d.raddr, d.rport)} hold {ratio:.0%} of the "
                    f"{d.range_size} local ports in ip_local_port_range: connect() to it will start failing with "
                    "'Cannot assign requested address'; usually a client opening a new connection per request "
                    "instead of reusing them."
                ),
                extra={"time_wait": d.count, "range_size": d.range_size, "ratio": round(ratio, 4),
                       "tcp_tw_reuse": reuse},
            )
        )
    return out


def time_wait_findings(rows: np.ndarray, netns: Mapping[int, Any], host_netns: int | None, th: Thresholds
                       ) -> tuple[list[tuple[str, int, int]], list[Flag]]:
    """The report's TIME_WAIT list (destination, count, range size) and the
    ``time_wait_pressure`` flags, from inventory rows (TIME_WAIT and the
    listeners at least) and the namespaces' facts (``port_range``,
    ``tw_reuse``) by inode.  One place for the full scan and the TIME_WAIT
    refresh between full scans."""
    port_ranges = {ino: n.port_range for ino, n in netns.items()}
    dests = time_wait_by_destination(rows, port_ranges, host_netns, th.top, th.time_wait_warn_ratio)
    listed = [(d.dest, d.count, d.range_size or 0) for d in dests[: th.top]]
    return listed, time_wait_flags(dests, th, {ino: n.tw_reuse for ino, n in netns.items()})
