"""What ``tracer run`` prints and writes about a run: the summary text, the
``--report`` JSON and the ``--junit`` XML (one test case per flag kind).  Pure.
"""

from __future__ import annotations

import shlex
from typing import Any
from xml.etree import ElementTree as ET

from pytracer.format import duration, endpoint
from pytracer.leaks.detectors import KINDS, Flag
from pytracer.leaks.gate import RunResult
from pytracer.views.leaks import _table, flag_lines
from pytracer.views.model import histogram_json, lifetime_all, summary
from pytracer.views.text import chart_lines

__all__ = ["junit_xml", "report_json", "summary_text"]


def _n(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _verdict_line(r: RunResult) -> str:
    cmd = shlex.join(r.argv)
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    head = f"tracer run: `{cmd}` exited {r.exit_code} after {duration(r.seconds)}"
    if r.exit_code != 0:
        return f"{head}; exit {r.verdict} (the command's own failure)"
    if r.verdict:
        return f"{head}; FAILED: flagged {', '.join(r.failed_kinds)} (--fail-on {','.join(r.fail_on)}); exit 1"
    also = f" (flagged, not failing: {', '.join(r.kinds)})" if r.kinds else ""
    return f"{head}; passed{also}; exit 0"


def summary_text(r: RunResult) -> str:
    life = lifetime_all(r.totals)
    s = summary(life)
    t = r.tree
    lines = [
        _verdict_line(r),
        f"process tree: {_n(t.followed + 1, 'process', 'processes')} ({t.followed} forked), "
        f"{len(t.pids)} still running"
        + (f", {t.full} NOT followed (pid filter full)" if t.full else ""),
        "connections by the tree: opened {} (active {}, passive {}), closed {} (active {}, passive {})".format(
            sum(r.opened.values()), r.opened["active"], r.opened["passive"],
            sum(r.closed.values()), r.closed["active"], r.closed["passive"]),
        f"lifetime of closed connections: n={s['count']} p50={duration(s['p50_seconds'])} "
        f"p90={duration(s['p90_seconds'])} p99={duration(s['p99_seconds'])}",
        *chart_lines(life),
    ]
    if r.flags:
        lines.append(f"flags raised during the run: {len(r.flags)}")
        lines.extend(flag_lines(r.flags))
    else:
        lines.append("flags raised during the run: none")
    if r.flags_dropped:
        lines.append(f"  ... and {r.flags_dropped} more not kept")
    if r.outlived:
        lines.append(f"processes that outlived the command: {len(r.outlived)}")
        rows = [["PID", "COMM", "FD", "STATE", "LOCAL", "REMOTE"]]
        for p in r.outlived:
            if not p["sockets"]:
                rows.append([str(p["pid"]), p["comm"], "-", "(no TCP socket)", "", ""])
            for s_ in p["sockets"]:
                rows.append([str(p["pid"]), p["comm"], str(s_["fd"]), s_["state"], endpoint(s_["laddr"], s_["lport"]),
                             endpoint(s_["raddr"], s_["rport"]) if s_["state"] != "LISTEN" else "*"])
        lines.extend(_table(rows, "  "))
    if r.lost.get("insert_failed"):
        lines.append(f"warning: {r.lost['insert_failed']} sockets not recorded "
                     "(socket table full: raise --max-sockets)")
    for e in r.errors:
        lines.append(f"warning: {e}")
    return "\n".join(lines)


def report_json(r: RunResult) -> dict[str, Any]:
    life = lifetime_all(r.totals)
    return {
        "command": r.argv,
        "user": r.user,
        "exit_code": r.exit_code,
        "verdict": r.verdict,
        "fail_on": list(r.fail_on),
        "failed_kinds": r.failed_kinds,
        "seconds": round(r.seconds, 3),
        "tree": r.tree.to_json(),
        "opened": r.opened,
        "closed": r.closed,
        "lifetime": summary(life),
        "lifetime_histogram": histogram_json(life),
        "flags": [f.to_json() for f in r.flags],
        "flags_dropped": r.flags_dropped,
        "outlived": r.outlived,
        "thresholds": dict(r.thresholds.__dict__),
        "lost": r.lost,
        "errors": r.errors,
    }


def _flag_text(f: Flag) -> str:
    where = f"{endpoint(f.laddr, f.lport)} -> {endpoint(f.raddr, f.rport)}" if f.laddr and f.lport else ""
    return (f"pid {f.pid} ({f.comm or '?'}) fd {f.fd if f.fd is not None else '-'} {f.state or ''} {where} "
            f"for {duration(f.seconds)}: {f.detail}").replace("  ", " ")


def junit_xml(r: RunResult) -> bytes:
    """A JUnit XML file: one test case per flag kind, failed when that kind
    was flagged and is in --fail-on (flagged otherwise: passed, the flags in
    its system-out)."""
    by_kind: dict[str, list[Flag]] = {k: [] for k in KINDS}
    for f in r.flags:
        by_kind.setdefault(f.kind, []).append(f)
    failures = sum(1 for k, fl in by_kind.items() if fl and k in r.fail_on)
    suite = ET.Element("testsuite", name="tracer run", tests=str(len(by_kind)), failures=str(failures),
                       errors="0", skipped="0", time=f"{r.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in (("command", shlex.join(r.argv)), ("exit_code", str(r.exit_code)),
                        ("fail_on", ",".join(r.fail_on))):
        ET.SubElement(props, "property", name=name, value=value)
    for kind, flags in by_kind.items():
        case = ET.SubElement(suite, "testcase", classname="tracer.run.leaks", name=kind, time="0")
        if not flags:
            continue
        text = "\n".join(_flag_text(f) for f in flags)
        if kind in r.fail_on:
            fail = ET.SubElement(case, "failure", type=kind, message=f"{len(flags)} flagged: {kind}")
            fail.text = text
        else:
            ET.SubElement(case, "system-out").text = text
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)
