"""Human formatting shared by the terminal and plain-text views.  Pure."""

from __future__ import annotations

from typing import Any

from pytracer.format import duration, endpoint
from pytracer.kernel.histogram import Histogram

# Display rows for the lifetime chart: powers of 4 in microseconds, which
# fall exactly on kernel slot boundaries (about 1ms, 4ms, 16ms ... 72m).
DISPLAY_BOUNDS = [(1 << (10 + 2 * k)) / 1e6 for k in range(12)]


def chart_rows(h: Histogram) -> list[tuple[str, int]]:
    """(label, count) per display bucket, non-cumulative, trimmed of empty ends."""
    cum = h.cumulative(DISPLAY_BOUNDS)
    rows = []
    prev_count, prev_le = 0, 0.0
    for le, c in cum:
        label = f"<= {duration(le)}" if le != float("inf") else f"> {duration(prev_le)}"
        rows.append((label, c - prev_count))
        prev_count, prev_le = c, le
    nonzero = [i for i, (_, n) in enumerate(rows) if n]
    if not nonzero:
        return []
    return rows[nonzero[0] : nonzero[-1] + 1]


def chart_lines(hist: Histogram, indent: str = "  ") -> list[str]:
    """The lifetime histogram as text bars, one line per display bucket."""
    rows = chart_rows(hist)
    peak = max((n for _, n in rows), default=0)
    return [f"{indent}{label:>10} {n:>8} {'#' * (round(30 * n / peak) if peak else 0)}" for label, n in rows]


def socket_cells(s: dict[str, Any]) -> list[str]:
    age = duration(s["age_seconds"])
    if not s.get("age_known", True):
        age = ">=" + age
    return [
        str(s["pid"] or "-"),
        s["comm"] or "-",
        s["state"],
        age,
        duration(s["state_age_seconds"]),
        endpoint(s["laddr"], s["lport"]),
        endpoint(s["raddr"], s["rport"]),
        s["direction"],
    ]


SOCKET_HEADERS = ["PID", "COMM", "STATE", "AGE", "IN STATE", "LOCAL", "REMOTE", "DIR"]


def plain(report: dict[str, Any], hist: Histogram) -> str:
    """A compact text block for non-terminal output."""
    lines = list(report.get("warnings") or [])
    states = " ".join(f"{k}={v}" for k, v in report["states"].items()) or "(none)"
    lines.append(
        f"[{report['ts']:.0f}] opened {report['opened']} ({report['opened_per_second']}/s) "
        f"closed {report['closed']} ({report['closed_per_second']}/s) tracked {report['tracked_sockets']}"
    )
    lines.append(f"  states: {states}")
    life = report["lifetime"]["all"]
    lines.append(
        f"  lifetime: n={life['count']} p50={duration(life['p50_seconds'])} "
        f"p90={duration(life['p90_seconds'])} p99={duration(life['p99_seconds'])}"
    )
    lines.extend(chart_lines(hist))
    by_key = {s["cookie"]: s for s in report["sockets"]}
    for title, keys in (("longest-lived", report["longest_lived"]), ("longest in state", report["longest_in_state"])):
        if not keys:
            continue
        lines.append(f"  {title}:")
        lines.append("    " + "  ".join(SOCKET_HEADERS))
        for k in keys:
            lines.append("    " + "  ".join(socket_cells(by_key[k])))
    for line in service_lines(report.get("services") or []):
        lines.append("  " + line)
    flags = report.get("flags") or []
    if flags:
        lines.append(f"  flagged: {len(flags)}")
        for fl in flags[:20]:
            lines.append(f"    {fl['kind']} pid={fl.get('pid')} {fl.get('comm')} fd={fl.get('fd')} {fl.get('detail')}")
    return "\n".join(lines)


def service_lines(services: list[dict[str, Any]]) -> list[str]:
    """One line per service that ended connections: lifetime and, by who
    ended them, the median idle before the end."""
    out = []
    for s in services:
        name = s["service"] if not s["role"] else f"{s['role']}:{s['service']}"
        idle = " ".join(f"{e}={v['count']}@{duration(v['p50_s'])}" for e, v in s["idle_before_end"].items())
        out.append(f"service {name}: ended {s['ends']} lifetime p95={duration(s['lifetime_p95_s'])} "
                   f"idle before end: {idle or '-'}")
    return out
