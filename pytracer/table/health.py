"""Is the socket table full?  What can honestly be said when it was.

The kernel counts every socket it could not put in the table (the
``insert_failed`` stat: table full, or out of memory).  Such a socket is
missing from every state count and top list, and the kernel only tries it
again at its next state change.  So the warning holds while the table is
full now, or while inserts failed recently (within :data:`RECENT_S`
seconds, measured from the readings actually taken); once the table has
room and nothing failed for that long, it clears.  The total since start
stays in the figures.

:func:`running_tables` reads the tables of the tracers running on the host
(``tracer doctor``), by map ID.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from pytracer.kernel import abi, libbpf
from pytracer.kernel.abi import Stat

# Failed inserts this recent keep the warning up (seconds).
RECENT_S = 10.0


@dataclass(frozen=True)
class TableFill:
    entries: int
    capacity: int
    failed_total: int
    failed_recent: int
    recent_seconds: float

    @property
    def full(self) -> bool:
        return self.failed_recent > 0 or (self.capacity > 0 and self.entries >= self.capacity)

    def warning(self) -> str | None:
        """One line, or None while the table is healthy."""
        if not self.full:
            return None
        return (f"WARNING: socket table full ({self.entries:,}/{self.capacity:,} entries): "
                f"{self.failed_recent:,} socket(s) could not be tracked in the last {self.recent_seconds:.0f} s "
                f"({self.failed_total:,} since start); counts cover tracked sockets only: raise --max-sockets")

    def to_json(self) -> dict[str, Any]:
        return {"table_full": self.full, "insert_failed_recent": self.failed_recent,
                "insert_failed_recent_seconds": round(self.recent_seconds, 1)}


class FillTracker:
    """Readings of the failed-insert counter, kept just long enough to tell
    failures of the last :data:`RECENT_S` seconds from older ones."""

    def __init__(self, start_ns: int, failed_at_start: int = 0, window_s: float = RECENT_S) -> None:
        self.window_ns = int(window_s * 1e9)
        self.samples: deque[tuple[int, int]] = deque([(start_ns, failed_at_start)])

    def update(self, now_ns: int, entries: int, capacity: int, failed_total: int) -> TableFill:
        self.samples.append((now_ns, failed_total))
        # The base is the newest reading at least a window old (else the oldest).
        while len(self.samples) > 1 and self.samples[1][0] <= now_ns - self.window_ns:
            self.samples.popleft()
        base_ns, base_failed = self.samples[0]
        return TableFill(entries, capacity, failed_total, max(0, failed_total - base_failed),
                         max(now_ns - base_ns, 0) / 1e9)


def failed_inserts(totals: Any) -> int:
    return int(totals.stat(Stat.INSERT_FAILED))


@dataclass
class RunningTable:
    """One tracer's socket table, seen from outside it."""

    pid: int | None
    comm: str
    entries: int
    capacity: int
    failed_total: int


@dataclass
class _Maps:
    """Another process's socks and agg maps, as the poller reads them."""

    socks: Any
    agg: Any
    ncpus: int
    nursery: Any = None  # its "nursery" map (CO-RE build), if it has one

    @property
    def nursery_slots(self) -> int:
        return int(self.nursery.max_entries) if self.nursery is not None else 0

    def map(self, name: str) -> Any:
        return {"socks": self.socks, "nursery": self.nursery}.get(name, self.agg)


def _map_owners(ids: set[int]) -> dict[int, int]:
    """map id -> a pid holding it (from /proc/*/fdinfo)."""
    out: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{base}/{fd}") != "anon_inode:bpf-map":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("map_id:"):
                            mid = int(line.split()[1])
                            if mid in ids:
                                out.setdefault(mid, int(pid))
                            break
            except (OSError, ValueError):
                continue
    return out


def _comm(pid: int | None) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        # `tracer watch`, `python -m pytracer export`: the subcommand says which.
        words = [w.decode(errors="replace") for w in argv if w]
        sub = next((w for w in words if w in ("watch", "export", "leaks", "doctor", "run")), "")
        return f"tracer {sub}".strip()
    except OSError:
        return "?"


def running_tables(exclude_pid: int | None = None) -> list[RunningTable]:
    """The socket tables of the pytracer instances on the host (CO-RE and bcc
    alike: a "socks" map of our record size, paired with its process's
    "agg" map).  Needs CAP_SYS_ADMIN; raises libbpf.LibbpfError without it."""
    from pytracer.table import poll as poller
    from pytracer.table import reads

    sock_size, agg_size = ctypes.sizeof(abi.PtSock), ctypes.sizeof(abi.PtAgg)
    ours = {("socks", sock_size), ("agg", agg_size), ("nursery", reads.SLOT_DTYPE.itemsize)}
    opened: dict[int, libbpf.MapById] = {}
    try:
        for mid in libbpf.map_ids():
            try:
                m = libbpf.MapById(mid)
            except libbpf.LibbpfError:
                continue
            if (m.name, m.value_size) in ours:
                opened[mid] = m
            else:
                m.close()
        if not any(m.name == "socks" for m in opened.values()):
            return []
        owners = _map_owners(set(opened))
        aggs = {owners.get(mid): m for mid, m in opened.items() if m.name == "agg"}
        # A nursery of one slot is the object's placeholder: not in use.
        nurseries = {owners.get(mid): m for mid, m in opened.items() if m.name == "nursery" and m.max_entries > 1}
        ncpus = libbpf.num_possible_cpus()
        out = []
        for mid, m in sorted(opened.items()):
            pid = owners.get(mid)
            if m.name != "socks" or pid == exclude_pid or pid not in aggs:
                continue
            src = _Maps(m, aggs[pid], ncpus, nurseries.get(pid))
            entries = reads.count_socks(src)[1]  # a chunk at a time, not the whole table
            failed = failed_inserts(poller.read_totals(src))
            out.append(RunningTable(pid, _comm(pid), entries, m.max_entries + src.nursery_slots, failed))
        return out
    finally:
        for m in opened.values():
            m.close()
