"""pytracer.views.run: the JUnit XML, the JSON report and the summary text of a run.  Pure."""

from xml.etree import ElementTree as ET

import numpy as np

from pytracer.kernel import abi
from pytracer.leaks.detectors import KINDS, Flag
from pytracer.leaks.gate import RunResult
from pytracer.leaks.thresholds import Thresholds
from pytracer.table.poll import Totals
from pytracer.table.tree import Tree
from pytracer.views.run import junit_xml, report_json, summary_text


def result(flags: list[Flag], code: int = 0, fail_on: tuple[str, ...] = ("close_wait",), verdict: int = 1,
           outlived: list | None = None) -> RunResult:
    hists = np.zeros((abi.PT_HISTS, abi.PT_HIST_SLOTS + 1), np.uint64)
    hists[abi.PT_HIST_LIFETIME + 0, 40] = 3  # three active connections
    totals = Totals(np.zeros(abi.PT_STATS, np.uint64), np.zeros((16, 16), np.uint64), hists)
    return RunResult(argv=["pytest", "-x"], user="ci", exit_code=code, verdict=verdict, fail_on=fail_on,
                     seconds=12.5, flags=flags, flags_dropped=0, tree=Tree((), 4, 5, 0),
                     opened={"active": 3, "passive": 0}, closed={"active": 3, "passive": 0}, totals=totals,
                     outlived=outlived or [], thresholds=Thresholds())


CW = Flag("close_wait", cookie=1, pid=42, comm="python3", fd=5, state="CLOSE_WAIT", seconds=3.2,
          laddr="127.0.0.1", lport=5000, raddr="127.0.0.1", rport=80, detail="never closed fd 5")
IDLE = Flag("idle_established", cookie=2, pid=43, comm="worker", fd=6, state="ESTABLISHED", seconds=400.0,
            laddr="127.0.0.1", lport=5001, raddr="127.0.0.1", rport=80, detail="idle")


def test_junit_has_one_case_per_kind_failing_only_fail_on_kinds() -> None:
    root = ET.fromstring(junit_xml(result([CW, IDLE])))
    assert root.tag == "testsuite" and root.get("tests") == str(len(KINDS)) and root.get("failures") == "1"
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == set(KINDS)
    fail = cases["close_wait"].find("failure")
    assert fail is not None and "pid 42 (python3) fd 5" in (fail.text or "")
    assert "127.0.0.1:5000 -> 127.0.0.1:80" in (fail.text or "")
    # Flagged but not in --fail-on: passes, with the flag in its output.
    assert cases["idle_established"].find("failure") is None
    assert "pid 43" in (cases["idle_established"].findtext("system-out") or "")
    assert all(c.find("failure") is None for n, c in cases.items() if n != "close_wait")


def test_junit_of_a_clean_run_has_no_failure() -> None:
    root = ET.fromstring(junit_xml(result([], verdict=0)))
    assert root.get("failures") == "0" and root.find(".//failure") is None


def test_report_and_summary_say_the_same_thing() -> None:
    held = [{"pid": 99, "comm": "daemon", "cmdline": "daemon", "sockets": [
        {"fd": 3, "state": "LISTEN", "family": "ipv4", "laddr": "127.0.0.1", "lport": 8080, "raddr": "0.0.0.0",
         "rport": 0, "inode": 1}]}]
    r = result([CW], outlived=held)
    rep = report_json(r)
    assert rep["verdict"] == 1 and rep["failed_kinds"] == ["close_wait"] and rep["flags"][0]["pid"] == 42
    assert rep["lifetime"]["count"] == 3 and rep["lifetime_histogram"][-1]["count"] == 3
    text = summary_text(r)
    assert "FAILED: flagged close_wait" in text and "exit 1" in text
    assert "opened 3 (active 3, passive 0)" in text
    assert "processes that outlived the command: 1" in text and "127.0.0.1:8080" in text
    assert "the command's own failure" in summary_text(result([CW], code=2, verdict=2))
