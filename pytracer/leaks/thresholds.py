"""The leak detectors' thresholds: when a socket or process is flagged.

Apart from :mod:`pytracer.leaks.detectors` so the command line can declare its
options without importing numpy (``tracer watch`` attaches before it loads
the heavy layers).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Thresholds:
    """When a socket or process is flagged.  Seconds unless named otherwise."""

    close_wait_after: float = 60.0
    idle_after: float = 300.0
    last_ack_after: float = 60.0
    fin_wait2_after: float | None = None  # None: the namespace's net.ipv4.tcp_fin_timeout
    fd_warn_ratio: float = 0.8
    time_wait_warn_ratio: float = 0.5
    growth_polls: int = 3  # successive polls the CLOSE_WAIT count must not fall over
    growth_min: int = 3  # and rise by at least this much
    top: int = 10  # TIME_WAIT destinations reported
    # tcp_info: exact lookups per namespace per scan; a namespace with more
    # candidates gets one dump with tcp_info instead (cheaper per socket).
    max_exact_lookups: int = 256
    # idle_reset: at least this many connections reset (or, as a client,
    # closed by the peer) after the same idle time of at least
    # idle_reset_min_seconds, with idle_reset_peak of them within one
    # bucket of the most common one.
    idle_reset_min_hits: int = 3
    idle_reset_min_seconds: float = 1.0
    idle_reset_peak: float = 0.6
    # A socket flagged idle_established is measured again (tcp_info) this
    # often, its flag carried in between (pytracer.leaks.idle_carry).  None:
    # a fifth of idle_after, within 1-60 s.
    idle_recheck: float | None = None

    @property
    def idle_recheck_s(self) -> float:
        if self.idle_recheck is not None:
            return self.idle_recheck
        return min(60.0, max(1.0, self.idle_after / 5))

    @property
    def idle_brief_ms(self) -> int:
        """tcp_info of an ESTABLISHED socket idle for less than this is only
        its idle time (see pytracer.inventory.tcpinfo.TcpInfoTable)."""
        return int(self.idle_after * 1000)

    def validate(self) -> None:
        for name in ("close_wait_after", "idle_after", "last_ack_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.fin_wait2_after is not None and self.fin_wait2_after < 0:
            raise ValueError("fin_wait2_after must be >= 0")
        if self.idle_recheck is not None and self.idle_recheck < 0:
            raise ValueError("idle_recheck must be >= 0")
        for name in ("fd_warn_ratio", "time_wait_warn_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.idle_reset_min_hits < 1 or self.idle_reset_min_seconds < 0 or not 0 < self.idle_reset_peak <= 1:
            raise ValueError("idle_reset_min_hits must be >= 1, idle_reset_min_seconds >= 0, idle_reset_peak in (0, 1]")
        if self.growth_polls < 1 or self.growth_min < 1:
            raise ValueError("growth_polls and growth_min must be >= 1")
