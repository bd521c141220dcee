"""Leak scans inside ``tracer watch`` intervals, held to a duty cycle.

``tracer watch`` reports every interval; a full leak scan walks the fd
tables and dumps every socket, which on a busy host takes a noticeable part
of a second, and the scans in between cost in proportion to their
candidates.  :func:`watch_enricher` runs a
:class:`~pytracer.leaks.scanner.Scanner` no more often than a duty cycle
allows and copies its latest findings into each report.
"""

from __future__ import annotations

import time
from typing import Any

from pytracer.inventory import procs
from pytracer.leaks.report import LeakReport
from pytracer.leaks.scanner import Scanner
from pytracer.leaks.thresholds import Thresholds
from pytracer.table.poll import Snapshot

__all__ = ["LEAK_DUTY", "DutyCycle", "watch_enricher"]

# The share of the wall clock leak scans may take in ``tracer watch`` and
# ``tracer export`` (pytracer.exporter.collector).  Scans between
# full scans cost in proportion to their candidates (milliseconds on a
# healthy host), so the cycle matters only when there is a pile: 20,000
# idle ESTABLISHED sockets made every scan ~1.3 s here (held to every ~25 s
# at 5%); their flags are now carried between rechecks a minute apart
# (pytracer.leaks.idle_carry), and only the recheck costs that much.
LEAK_DUTY = 0.05


class DutyCycle:
    """A :class:`~pytracer.leaks.scanner.Scanner` held to ``duty`` of the wall
    clock: a new scan starts only once (1/duty - 1) times the last scan's
    duration has passed; in between, :meth:`scan` returns the last findings.
    ``tracer watch`` (below) and ``tracer run`` (:mod:`pytracer.leaks.gate`)
    scan through one."""

    def __init__(self, scanner: Scanner, duty: float = 0.25) -> None:
        self.scanner = scanner
        self.duty = duty
        self.last: tuple[LeakReport, float, float] | None = None  # (report, monotonic end, cost)
        self.table_ns: int | None = None  # when the table the last scan judged was read

    def scan(self, snap: Snapshot | None) -> tuple[LeakReport, bool]:
        """The latest findings, and whether this call scanned afresh."""
        now = time.monotonic()
        last = self.last
        # Candidate scans select from the table: only a table read since the
        # last scan has anything new for them (see TablePoller).
        table_ns = snap.table_mono_ns if snap is not None else None
        fresh = table_ns is None or table_ns != self.table_ns
        if last is None or (fresh and now - last[1] >= last[2] * (1.0 / self.duty - 1.0)):
            self.table_ns = table_ns
            lr = self.scanner.scan(snap)
            self.last = (lr, time.monotonic(), float(lr.stats.get("scan_seconds") or 0.0))
            return lr, True
        return last[0], False


def watch_enricher(thresholds: Thresholds, duty: float = LEAK_DUTY):
    """An enricher for ``tracer watch`` (see pytracer/cli/watch.py): each report
    gets ``flags``, the TIME_WAIT / NEW_SYN_RECV counts the table cannot hold,
    and a ``leaks`` summary.

    The Scanner is incremental (:mod:`pytracer.leaks.incremental`): most
    scans look only at the candidates the socket table selects and cost
    milliseconds; a full scan (every socket, every fd table) comes on its
    own slow cadence.  To keep even those under ``duty`` of the wall clock,
    a new scan starts only once (1/duty - 1) times the last scan's duration
    has passed; reports in between repeat the last findings, and
    ``leaks.age_seconds`` says how old they are.
    """

    def enrich(report: dict[str, Any], snap: Snapshot, tracer: Any, opts: Any, state: dict[str, Any]) -> None:
        cycle = state.get("leak_cycle")
        if cycle is None:
            cycle = state["leak_cycle"] = DutyCycle(
                Scanner(tracer, thresholds, pids=getattr(opts, "pids", ()), incremental=True), duty)
        scanner = cycle.scanner
        lr, _ = cycle.scan(snap)
        now = time.monotonic()
        # Reports between scans repeat the last findings: their JSON is made once per scan.
        if state.get("flags_of") is not lr:
            state["flags_of"], state["flags_json"] = lr, [f.to_json() for f in lr.flags]
        report["flags"] = state["flags_json"]
        _name_holders(report.get("sockets") or [], scanner, tracer, snap)
        if not scanner.pids:
            for name in ("TIME_WAIT", "NEW_SYN_RECV"):
                if lr.inventory_states.get(name):
                    report["states"][name] = lr.inventory_states[name]
        report["leaks"] = {
            "time_wait": lr.time_wait_json(),
            "errors": lr.errors,
            "scan_seconds": lr.stats.get("scan_seconds"),
            "age_seconds": round(max(0.0, now - lr.mono_ns / 1e9), 3),
            "netns_covered": lr.stats.get("netns_covered"),
            "records_reaped": lr.stats.get("records_reaped", 0),
        }

    return enrich


def _name_holders(rows: list[dict[str, Any]], scanner: Scanner, tracer: Any, snap: Snapshot | None = None) -> None:
    """Give rows the table has no owner for (accepted sockets when no accept
    hook runs: see pytracer.kernel.hooks) the pid and fd that hold them, from
    the last scan's fd table.  Only the few rows shown, never the table."""
    if getattr(tracer, "key_by_ptr", False):
        return  # row keys are sk pointers, not cookies
    missing = [r for r in rows if r.get("pid") is None]
    if not missing:
        return
    held = scanner.holders([r["cookie"] for r in missing], snap)
    for r in missing:
        if r["cookie"] in held:
            pid, fd, ino = held[r["cookie"]]
            r["pid"], r["fd"], r["inode"] = pid, fd, ino
            r["comm"] = procs.comm(pid) or r.get("comm") or ""
