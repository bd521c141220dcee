"""The live terminal view (rich): states, rates, lifetime chart, top sockets."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pytracer.format import duration
from pytracer.kernel.histogram import Histogram
from pytracer.views.text import SOCKET_HEADERS, chart_rows, socket_cells


def _states_table(report: dict[str, Any]) -> Table:
    t = Table(title="sockets by state", expand=False)
    t.add_column("STATE")
    t.add_column("COUNT", justify="right")
    for k, v in report["states"].items():
        t.add_row(k, str(v))
    return t


def _chart(hist: Histogram) -> Table:
    t = Table(title="connection lifetime", expand=False, show_edge=False)
    t.add_column("LIFETIME", justify="right")
    t.add_column("COUNT", justify="right")
    t.add_column("", min_width=30)
    rows = chart_rows(hist)
    peak = max((n for _, n in rows), default=0)
    for label, n in rows:
        width = round(40 * n / peak) if peak else 0
        t.add_row(label, str(n), Text("█" * width, style="cyan"))
    return t


def _sockets(title: str, keys: list[int], by_key: dict[int, dict[str, Any]]) -> Table:
    t = Table(title=title, expand=True)
    for h in SOCKET_HEADERS:
        t.add_column(h, no_wrap=True)
    for k in keys:
        t.add_row(*socket_cells(by_key[k]))
    return t


def _flags(report: dict[str, Any]) -> Table | None:
    flags = report.get("flags") or []
    if not flags:
        return None
    t = Table(title=f"flagged ({len(flags)})", expand=True, title_style="bold red")
    for h in ("KIND", "PID", "COMM", "FD", "STATE", "FOR", "DETAIL"):
        t.add_column(h)
    for f in flags[:15]:
        t.add_row(
            f["kind"], str(f.get("pid") or "-"), f.get("comm") or "-",
            str(f.get("fd") if f.get("fd") is not None else "-"),
            f.get("state") or "-", duration(f.get("seconds")), f.get("detail") or "",
        )
    return t


def render(report: dict[str, Any], hist: Histogram, header: str) -> Group:
    life = report["lifetime"]["all"]
    tr = report["tracer"]
    summary = Text.assemble(
        (header + "\n", "bold"),
        f"opened {report['opened_per_second']}/s   closed {report['closed_per_second']}/s   ",
        f"tracked {report['tracked_sockets']}   ",
        f"lifetime p50 {duration(life['p50_seconds'])} p99 {duration(life['p99_seconds'])}   ",
        (f"map {tr['map_entries']}/{tr['map_capacity']}   ", ""),
        (f"insert failures {tr['insert_failed']}", "bold red" if tr["insert_failed"] else "green"),
        *(("\n" + w, "bold red") for w in report.get("warnings") or []),
    )
    top = Table.grid(padding=(0, 4))
    top.add_row(_states_table(report), _chart(hist))
    by_key = {s["cookie"]: s for s in report["sockets"]}
    parts: list[Any] = [Panel(summary), top]
    flags = _flags(report)
    if flags is not None:
        parts.append(flags)
    parts.append(_sockets("longest-lived", report["longest_lived"], by_key))
    parts.append(_sockets("longest in current state", report["longest_in_state"], by_key))
    return Group(*parts)
