"""The text view of a leak report (``tracer leaks``, and ``tracer watch``'s
plain output of flags): a table of flagged sockets with the sentence that
explains each, TIME_WAIT by destination, and processes with CLOSE_WAIT.  Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytracer.format import duration, endpoint

if TYPE_CHECKING:
    from pytracer.leaks.detectors import Flag
    from pytracer.leaks.scanner import LeakReport
    from pytracer.table.writer import SeedResult


def _for(f: Flag) -> str:
    if f.seconds is None:
        return "-"
    return (">=" if f.at_least else "") + duration(f.seconds)


def _cells(f: Flag) -> list[str]:
    local = endpoint(f.laddr, f.lport) if f.laddr is not None and f.lport is not None else "-"
    remote = endpoint(f.raddr, f.rport) if f.raddr is not None and f.rport is not None else "-"
    return [
        f.kind,
        str(f.pid) if f.pid is not None else "-",
        f.comm or "-",
        str(f.fd) if f.fd is not None else "-",
        f.state or "-",
        _for(f),
        duration(f.idle_seconds) if f.idle_seconds is not None else "-",
        local,
        remote,
        f.held_by or "-",
    ]


HEADERS = ["KIND", "PID", "COMM", "FD", "STATE", "FOR", "IDLE", "LOCAL", "REMOTE", "HELD"]


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def flag_lines(flags: list[Flag], indent: str = "  ") -> list[str]:
    """The flag table: a header, then each flag and the sentences that explain it."""
    if not flags:
        return []
    table = _table([HEADERS, *(_cells(f) for f in flags)], indent)
    lines = [table[0]]
    for f, line in zip(flags, table[1:]):
        lines.append(line)
        lines.append(f"{indent}    {f.detail}")
        if f.cmdline:
            lines.append(f"{indent}    cmdline: {f.cmdline[:200]}")
    return lines


def render_text(rep: LeakReport, sr: SeedResult | None, scope: str) -> str:
    lines = []
    states = ", ".join(f"{k} {v}" for k, v in sorted(rep.inventory_states.items())) or "none"
    ns = rep.stats.get("netns_covered", 0)
    total = sum(rep.inventory_states.values())
    lines.append(f"tracer leaks: {scope}; {total} TCP sockets in {ns} network "
                 f"namespace{'s' if ns != 1 else ''} ({states})")
    if sr is not None:
        lines.append(sr.summary())
    if not rep.flags:
        lines.append("nothing flagged")
    else:
        lines.append(f"{len(rep.flags)} flagged:")
        lines.extend(flag_lines(rep.flags))
    if rep.time_wait:
        lines.append("TIME_WAIT by destination (local ports in use / ephemeral range):")
        rows = [[d, str(n), f"/ {r}" if r else "", f"({n / r:.1%})" if r else ""] for d, n, r in rep.time_wait]
        lines.extend(_table(rows, "  "))
    risky = [p for p in rep.processes.values() if p.close_wait or p.close_wait_backlog]
    if risky:
        lines.append("processes with CLOSE_WAIT sockets:")
        rows = [["PID", "COMM", "FDS", "CLOSE_WAIT", "BACKLOG", "GROWTH"]]
        for p in sorted(risky, key=lambda p: -(p.close_wait + p.close_wait_backlog)):
            fds = f"{p.open_fds}/{p.max_fds}" if p.max_fds else str(p.open_fds)
            growth = f"{p.close_wait_per_second * 60:.1f}/min" if p.close_wait_per_second else "-"
            rows.append([str(p.pid), p.comm or "-", fds, str(p.close_wait), str(p.close_wait_backlog), growth])
        lines.extend(_table(rows, "  "))
    for e in rep.errors:
        lines.append(f"warning: {e}")
    return "\n".join(lines)
