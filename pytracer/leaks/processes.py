"""Process rules: a process whose CLOSE_WAIT count keeps rising, and one
close to RLIMIT_NOFILE.  Pure: per-process counts and facts in, flags out;
the growth history is data the caller keeps between scans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pytracer.inventory.procs import ProcFacts
from pytracer.leaks.detectors import Flag, human, who
from pytracer.leaks.thresholds import Thresholds

ProcKey = tuple  # (pid, start_ticks)


@dataclass
class GrowthSample:
    mono_seconds: float
    count: int


def update_growth(history: Mapping[ProcKey, list[GrowthSample]], now_seconds: float,
                  counts: Mapping[ProcKey, int], th: Thresholds) -> dict[ProcKey, list[GrowthSample]]:
    """The next history: one sample per process per poll, the last
    ``growth_polls + 1`` kept.  Processes that are gone are dropped; processes
    with no CLOSE_WAIT now and none in the window are not kept."""
    keep = th.growth_polls + 1
    out: dict[ProcKey, list[GrowthSample]] = {}
    for key, n in counts.items():
        samples = [*history.get(key, []), GrowthSample(now_seconds, int(n))][-keep:]
        if any(s.count for s in samples):
            out[key] = samples
    return out


def growth_rate(samples: list[GrowthSample], th: Thresholds) -> float | None:
    """CLOSE_WAIT sockets per second when the count is growing, else None.

    Growing: ``growth_polls`` successive intervals with no decrease and a
    total rise of at least ``growth_min``.
    """
    window = samples[-(th.growth_polls + 1) :]
    if len(window) < th.growth_polls + 1:
        return None
    counts = [s.count for s in window]
    if any(b < a for a, b in zip(counts, counts[1:])):
        return None
    rise = counts[-1] - counts[0]
    span = window[-1].mono_seconds - window[0].mono_seconds
    if rise < th.growth_min or span <= 0:
        return None
    return rise / span


def growth_flags(history: Mapping[ProcKey, list[GrowthSample]], procs: Mapping[int, ProcFacts],
                 th: Thresholds) -> list[Flag]:
    out = []
    for key, samples in sorted(history.items()):
        rate = growth_rate(samples, th)
        if rate is None:
            continue
        pid = key[0]
        p = procs.get(pid)
        window = samples[-(th.growth_polls + 1) :]
        rise = window[-1].count - window[0].count
        span = window[-1].mono_seconds - window[0].mono_seconds
        eta = None
        if p and p.max_fds and p.open_fds is not None and rate > 0:
            eta = max(0.0, (p.max_fds - p.open_fds) / rate)
        limit = (
            f"; at this rate it runs out of file descriptors ({p.open_fds}/{p.max_fds} used) in about {human(eta)}"
            if eta is not None and p is not None
            else ""
        )
        out.append(
            Flag(
                kind="close_wait_growth",
                pid=pid,
                comm=p.comm if p else None,
                cmdline=p.cmdline if p else None,
                cgroup=p.cgroup if p else None,
                container=p.container if p else None,
                state="CLOSE_WAIT",
                seconds=span,
                detail=(
                    f"{who(pid, procs)} holds {window[-1].count} CLOSE_WAIT sockets, up {rise} over the last "
                    f"{len(window) - 1} polls ({rate * 60:.1f}/min){limit}: it is not closing connections "
                    "its peers have closed."
                ),
                extra={
                    "close_wait": window[-1].count,
                    "rise": rise,
                    "per_second": round(rate, 4),
                    "seconds_to_fd_limit": None if eta is None else round(eta, 1),
                    "samples": [s.count for s in window],
                },
            )
        )
    return out


def fd_flags(procs: Mapping[int, ProcFacts], th: Thresholds) -> list[Flag]:
    out = []
    for pid, p in sorted(procs.items()):
        if not p.max_fds or p.open_fds is None:
            continue
        ratio = p.open_fds / p.max_fds
        if ratio < th.fd_warn_ratio:
            continue
        out.append(
            Flag(
                kind="fd_exhaustion",
                pid=pid,
                comm=p.comm,
                cmdline=p.cmdline,
                cgroup=p.cgroup,
                container=p.container,
                detail=(
                    f"{who(pid, procs)} has {p.open_fds} of its {p.max_fds} file descriptors open "
                    f"({ratio:.0%}): it will soon fail with 'Too many open files' (EMFILE); usually leaked "
                    "sockets or files, or RLIMIT_NOFILE set too low."
                ),
                extra={"open_fds": p.open_fds, "max_fds": p.max_fds, "ratio": round(ratio, 4)},
            )
        )
    return out
