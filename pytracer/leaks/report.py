"""What a leak scan returns: :class:`LeakReport`, and a :class:`ProcessSummary`
per process it looked at.  Plain data, shared by the full and the
candidate scans (:mod:`pytracer.leaks.scanner`, :mod:`pytracer.leaks.incremental`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pytracer.leaks.detectors import Flag

__all__ = ["LeakReport", "ProcessSummary"]


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
    # Per-service aggregates (pytracer.table.services.ServiceStats) the
    # idle_reset rule judged; empty without a tracer.
    services: list[Any] = field(default_factory=list)
    mono_ns: int = 0
    wall: float = 0.0

    def time_wait_json(self) -> list[dict[str, Any]]:
        return [{"dest": d, "count": n, "range_size": r} for d, n, r in self.time_wait]

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": round(self.wall, 3),
            "flags": [f.to_json() for f in self.flags],
            "time_wait": self.time_wait_json(),
            "states": self.inventory_states,
            "processes": {str(pid): p.to_json() for pid, p in sorted(self.processes.items())},
            "netns": self.netns,
            "errors": self.errors,
            "stats": self.stats,
            "services": [s.to_json() for s in self.services if s.ends],
        }
