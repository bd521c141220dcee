"""Golden shape of what users see: the JSON of `tracer watch --json`,
`tracer leaks --json` and `tracer doctor --json`, and the metric families of
`tracer export`, pinned in tests/fixtures/golden/.

Only public entry points are driven (the `tracer` command, its stdout, HTTP
scrapes of /metrics), so a restructuring of the package that changes no
behaviour leaves this test green, and any key added, removed or retyped
turns it red with the list of differences.

What is pinned is the shape, never the values:

* JSON: every key path, recursively, with the JSON type(s) of its value
  (number, string, bool, null, list, object).  List elements are merged
  into ``path[]`` (the union of their keys and types), except flags, which
  are grouped by kind (``flags[kind=close_wait]``) since each kind has its
  own ``extra``.  Maps keyed by data (state names, pids) collapse to ``*``.
* Prometheus: every family name, its type, its label names (over all its
  samples) and its sample suffixes (``_total``, ``_bucket``...).

The scenario is deterministic and made by the test on loopback, scoped with
--pid so other engineers' sockets on this host cannot change the shape:
the tracers start first, then the workloads make a listener with a socket
pair half-closed (one end CLOSE_WAIT, the other FIN_WAIT2, both held by an
fd), idle keep-alive connections, three short connections (closed: the
lifetime histograms fill, TIME_WAIT appears) and a process near its
RLIMIT_NOFILE.  Thresholds are 1 s, so each of those gets its flag.  A
second, whole-host exporter pins the families that only exist host-wide
(TIME_WAIT destinations); label names don't depend on the host's traffic.

Regenerate after an intended change (and review the diff):

    PYTRACER_GOLDEN_UPDATE=1 python -m pytest tests/kernel/test_golden.py
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import IN_VM, PYTHON, ROOT, WORKLOAD, Proc, fdinfo_ids, gone, live_prog_ids, tracer_cmd
from .exporter_helpers import Exporter, bpftool_ids, start_workload
from .leaky_support import require_root, wait_until

GOLDEN = ROOT / "tests" / "fixtures" / "golden"
# The raw outputs of the last run, for reading a failure.
RAW = Path(os.environ.get("PYTRACER_GOLDEN_RAW", "/tmp/pytracer-golden-raw"))
UPDATE = os.environ.get("PYTRACER_GOLDEN_UPDATE") == "1"
HOST = "127.0.0.1"
START_S = 600 if IN_VM else 60
SCENARIO_S = 600 if IN_VM else 90  # bound on waiting for every flag to show

# Thresholds short enough for the scenario's sockets to be flagged.
THRESHOLDS = ["--close-wait-after", "1", "--idle-after", "1"]
# Only watch and leaks have these.
MORE_THRESHOLDS = ["--fin-wait2-after", "1", "--fd-warn-ratio", "0.5"]
# Flag kinds the scenario makes, in watch and leaks.
FLAG_KINDS = {"close_wait", "fin_wait2_stuck", "idle_established", "fd_exhaustion"}

# JSON objects whose keys are data (TCP state names, pids), not schema.
DYNAMIC_MAPS = {"states", "processes", "seed.by_state"}
# JSON lists of flags: grouped by kind, since each kind has its own extras.
BY_KIND = {"flags"}

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("PYTRACER_BACKEND") or os.environ.get("PYTRACER_ATTACH")) or IN_VM,
    reason="the golden shape is the default configuration on the dev host's kernel",
)


@pytest.fixture(autouse=True)
def _default_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default configuration: no opt-in syscall hooks."""
    monkeypatch.delenv("PYTRACER_SYSCALL_HOOKS", raising=False)


# --- shapes ---------------------------------------------------------------------------


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):  # before int: bool is an int
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "object"
    raise TypeError(f"not a JSON value: {v!r}")


def json_shape(doc: Any) -> dict[str, str]:
    """Every key path of ``doc`` -> its JSON type(s), "a|b" when they vary
    (a list's elements merged)."""
    types: dict[str, set[str]] = {}

    def walk(v: Any, path: str, schema_path: str) -> None:
        if path:
            types.setdefault(path, set()).add(json_type(v))
        if isinstance(v, dict):
            dynamic = schema_path in DYNAMIC_MAPS
            for k, child in v.items():
                key = "*" if dynamic else k
                walk(child, f"{path}.{key}" if path else key, f"{schema_path}.{key}" if schema_path else key)
        elif isinstance(v, list):
            for item in v:
                seg = "[]"
                if schema_path in BY_KIND and isinstance(item, dict) and isinstance(item.get("kind"), str):
                    seg = f"[kind={item['kind']}]"
                walk(item, path + seg, schema_path + "[]")

    walk(doc, "", "")
    return {p: "|".join(sorted(t)) for p, t in sorted(types.items())}


def metric_shape(text: str) -> dict[str, str]:
    """Family name -> "type {label,names} suffixes" of a /metrics page."""
    out = {}
    for fam in text_string_to_metric_families(text):
        labels = sorted({k for s in fam.samples for k in s.labels})
        suffixes = sorted({s.name[len(fam.name):] or "''" for s in fam.samples})
        out[fam.name] = f"{fam.type} {{{','.join(labels)}}} " + (",".join(suffixes) or "(no samples)")
    return dict(sorted(out.items()))


def check_golden(name: str, got: dict[str, str], raw: Any) -> None:
    """Fail on any path (or family) added, removed or retyped against
    tests/fixtures/golden/<name>.json; rewrite it with PYTRACER_GOLDEN_UPDATE=1.
    ``raw`` (the output itself) is kept under RAW for reading a failure."""
    path = GOLDEN / f"{name}.json"
    RAW.mkdir(parents=True, exist_ok=True)
    raw_path = RAW / (f"{name}.json" if not isinstance(raw, str) else f"{name}.txt")
    raw_path.write_text(raw if isinstance(raw, str) else json.dumps(raw, indent=1))
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
        return
    assert path.exists(), f"{path} missing: run with PYTRACER_GOLDEN_UPDATE=1 to create it"
    want = json.loads(path.read_text())
    added = [f"  + {p}: {got[p]}" for p in got if p not in want]
    removed = [f"  - {p}: {want[p]}" for p in want if p not in got]
    changed = [f"  ~ {p}: {want[p]} -> {got[p]}" for p in want if p in got and want[p] != got[p]]
    if added or removed or changed:
        pytest.fail(
            f"{name}: output shape differs from {path.relative_to(ROOT)} "
            f"({len(added)} added, {len(removed)} removed, {len(changed)} changed):\n"
            + "\n".join(added + removed + changed)
            + f"\nThe output itself: {raw_path}"
            + "\nIf the change is intended, regenerate with PYTRACER_GOLDEN_UPDATE=1 and review the diff.",
            pytrace=False,
        )


# --- the scenario ---------------------------------------------------------------------


@dataclass
class Scenario:
    pid_args: list[str]
    watch_report: dict[str, Any] | None = None
    watch_rc: int | None = None
    watch_err: str = ""
    export_pid: str = ""
    export_host: str = ""
    # BPF program and link ids the long-running tracers held.
    held: dict[str, tuple[set[int], set[int]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    return fdinfo_ids(pid, "prog_id"), fdinfo_ids(pid, "link_id")


def still_attached(held: tuple[set[int], set[int]]) -> tuple[set[int], set[int]]:
    progs, links = held
    return progs & live_prog_ids(), links & bpftool_ids("link")


def watch_until_flagged(watch: Proc) -> dict[str, Any]:
    """The first report with every flag kind and closed connections in both
    directions; fails after SCENARIO_S."""
    deadline = time.monotonic() + SCENARIO_S
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            rep = watch.lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if rep is None:
            raise AssertionError(f"tracer watch exited early: {watch.stderr()}")
        last = rep
        kinds = {f.get("kind") for f in rep.get("flags", [])}
        life = rep.get("lifetime", {})
        if FLAG_KINDS <= kinds and all(life.get(d, {}).get("count", 0) >= 3 for d in ("active", "passive")):
            return rep
    summary = None if last is None else {
        "flags": sorted({f.get("kind") for f in last.get("flags", [])}), "lifetime": last.get("lifetime"),
        "states": last.get("states")}
    raise AssertionError(f"no watch report with flags {sorted(FLAG_KINDS)} within {SCENARIO_S}s; last: {summary}")


Samples = List[Tuple[str, Dict[str, str]]]  # (name, labels); a runtime alias: py3.9


def pid_scrape_ready(s: Samples) -> bool:
    """Every family the --pid scrape can fill has samples (fin_wait2_stuck
    needs --fin-wait2-after, which export does not have)."""
    kinds = ("close_wait", "idle_established", "fd_exhaustion")
    return (all(has(s, "pytracer_flagged_sockets", kind=k) for k in kinds)
            and has(s, "pytracer_transitions_total") and has(s, "pytracer_state_duration_seconds_count"))


def host_scrape_ready(s: Samples) -> bool:
    return (has(s, "pytracer_flagged_sockets", kind="close_wait") and has(s, "pytracer_time_wait_sockets")
            and has(s, "pytracer_transitions_total"))


def scrape_until(exp: Exporter, ready: Callable[[Samples], bool], what: str) -> str:
    """A /metrics page for which ready(samples) holds; bounded."""
    def attempt() -> str | None:
        text = exp.get(timeout=60)
        samples = [(s.name, s.labels) for fam in text_string_to_metric_families(text) for s in fam.samples]
        return text if ready(samples) else None

    return wait_until(attempt, SCENARIO_S, what, step=0.5)


def has(samples: Samples, name: str, **labels: str) -> bool:
    return any(n == name and all(lab.get(k) == v for k, v in labels.items()) for n, lab in samples)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    require_root()
    tmp = tmp_path_factory.mktemp("golden")
    started: list[Any] = []
    try:
        # The workloads wait for "go": their pids exist, no socket yet.
        stepper = Proc([PYTHON, str(WORKLOAD), "stepper", HOST, "0"], name="stepper")
        started.append(stepper)
        stepper.expect("ready")
        idle = start_workload("idle", HOST, 2)
        started.append(idle)
        churn = start_workload("churn", HOST, 3, 0, 0)
        started.append(churn)
        fdhog = start_workload("fdhog", HOST, 40, 64)
        started.append(fdhog)
        workloads = [stepper, idle, churn, fdhog]
        sc = Scenario([a for w in workloads for a in ("--pid", str(w.pid))])

        # The tracers attach before any socket exists: every socket is seen
        # from birth (directions, histories, lifetimes, transitions).
        watch = Proc([*tracer_cmd(), "watch", "--json", "--interval", "0.5", "--top", "100", "--duration", "900",
                      *THRESHOLDS, *MORE_THRESHOLDS, *sc.pid_args], name="tracer watch")
        started.append(watch)
        # --bpf-stats: without it the per-program run families appear only
        # while something else on the host has kernel.bpf_stats_enabled=1.
        exp_pid = Exporter(*sc.pid_args, *THRESHOLDS, "--leak-interval", "0", "--bpf-stats", "--duration", "900",
                           tmp=tmp)
        started.append(exp_pid)
        exp_host = Exporter("--close-wait-after", "1", "--leak-interval", "0", "--bpf-stats", "--duration", "900",
                            tmp=tmp)
        started.append(exp_host)
        try:  # the first report follows "attached" and the seeding
            first = watch.lines.get(timeout=START_S)
        except queue.Empty:
            first = None
        if first is None:
            raise AssertionError(f"tracer watch sent no report within {START_S}s: {watch.stderr()}")
        exp_pid.wait_ready(START_S)
        exp_host.wait_ready(START_S)
        sc.held = {"watch": bpf_ids(watch.pid), "export --pid": bpf_ids(exp_pid.pid),
                   "export": bpf_ids(exp_host.pid)}

        for w in workloads:
            w.send()
        stepper.expect("listening")
        stepper.send()
        stepper.expect("established")
        stepper.send()  # the client shuts down writing: FIN_WAIT2 / CLOSE_WAIT, both held
        stepper.expect("half_closed")
        for w in (idle, churn, fdhog):
            w.expect("holding", timeout=60)

        sc.watch_report = watch_until_flagged(watch)
        sc.export_pid = scrape_until(exp_pid, pid_scrape_ready, "the --pid exporter to show the scenario")
        sc.export_host = scrape_until(exp_host, host_scrape_ready, "the whole-host exporter to show the scenario")

        watch.p.send_signal(signal.SIGINT)
        sc.watch_rc = watch.wait(timeout=60)
        sc.watch_err = watch.stderr()
        for exp in (exp_pid, exp_host):
            rc = exp.stop()
            if rc != 0:
                sc.problems.append(f"tracer export exited {rc}: {exp.stderr()[-1000:]}")
        yield sc
    finally:
        for thing in reversed(started):
            if isinstance(thing, Exporter):
                thing.stop()
            else:
                thing.kill()


def run_watching_ids(args: list[str], timeout: float = START_S) -> tuple[subprocess.CompletedProcess, set, set]:
    """Run a short-lived `tracer` command, noting the BPF programs and links
    it holds while it runs (fdinfo) for the detach check."""
    p = subprocess.Popen([*tracer_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progs: set[int] = set()
    links: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while True:
            got_p, got_l = bpf_ids(p.pid)
            progs |= got_p
            links |= got_l
            try:
                out, err = p.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise AssertionError(f"tracer {' '.join(args)} did not finish within {timeout}s") from None
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), progs, links


# --- the tests ------------------------------------------------------------------------


def test_watch_json_shape(scenario: Scenario) -> None:
    rep = scenario.watch_report
    assert rep is not None
    assert scenario.watch_rc == 0, scenario.watch_err
    assert not rep["leaks"]["errors"], rep["leaks"]["errors"]
    assert rep["sockets"] and all(s["history"] for s in rep["sockets"]), "scenario: sockets seen from birth"
    check_golden("watch", json_shape(rep), rep)


def test_leaks_json_shape(scenario: Scenario) -> None:
    r, progs, links = run_watching_ids(["leaks", "--json", *THRESHOLDS, *MORE_THRESHOLDS, *scenario.pid_args])
    assert r.returncode == 1, f"exit {r.returncode} (1: something flagged): {r.stderr}"
    rep = json.loads(r.stdout)
    kinds = {f["kind"] for f in rep["flags"]}
    assert FLAG_KINDS <= kinds, f"scenario: flags {sorted(kinds)}, want {sorted(FLAG_KINDS)}"
    assert not rep["errors"], rep["errors"]
    assert gone(progs, links), "tracer leaks left BPF attached"
    check_golden("leaks", json_shape(rep), rep)


def test_export_families_with_pid(scenario: Scenario) -> None:
    assert not scenario.problems, scenario.problems
    check_golden("export_pid", metric_shape(scenario.export_pid), scenario.export_pid)


def test_export_families_whole_host(scenario: Scenario) -> None:
    assert not scenario.problems, scenario.problems
    check_golden("export_host", metric_shape(scenario.export_host), scenario.export_host)


def test_time_wait_lists_whole_host(scenario: Scenario) -> None:
    """TIME_WAIT has no owner, so under --pid both JSON outputs list no
    TIME_WAIT destinations: their element keys are pinned here, host-wide
    (the scenario's short connections left TIME_WAIT on loopback).  Only
    those lists are compared; the rest depends on the host's traffic."""
    r, progs, links = run_watching_ids(["leaks", "--json", "--top", "3"])
    assert r.returncode in (0, 1), r.stderr
    leaks_tw = json.loads(r.stdout)["time_wait"]
    w, wprogs, wlinks = run_watching_ids(["watch", "--json", "--interval", "0.5", "--duration", "1", "--top", "0"])
    assert w.returncode == 0, w.stderr
    watch_tw = json.loads(w.stdout.splitlines()[-1])["leaks"]["time_wait"]
    assert leaks_tw and watch_tw, f"scenario: no TIME_WAIT destinations on the host ({leaks_tw}, {watch_tw})"
    for who, (p, lk) in {"leaks": (progs, links), "watch": (wprogs, wlinks)}.items():
        assert gone(p, lk), f"tracer {who} left BPF attached"
    got = {f"leaks: {k}": v for k, v in json_shape({"time_wait": leaks_tw}).items()}
    got.update({f"watch: leaks.{k}": v for k, v in json_shape({"time_wait": watch_tw}).items()})
    check_golden("time_wait_whole_host", got, {"leaks": leaks_tw, "watch": watch_tw})


def test_doctor_json_shape() -> None:
    require_root()
    # A tracer of our own runs meanwhile, so running_tracers has a row to shape.
    other = subprocess.Popen([*tracer_cmd(), "watch", "--json", "--pid", str(os.getpid())],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert other.stderr is not None and "attached" in other.stderr.readline()
        r, progs, links = run_watching_ids(["doctor", "--json"])
    finally:
        other.terminate()
        other.wait(timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["status"].startswith("ok"), info["status"]
    assert gone(progs, links), "tracer doctor left BPF attached"
    check_golden("doctor", json_shape(info), info)


def test_nothing_left_attached(scenario: Scenario) -> None:
    """The long-running tracers held programs and links; after their exit
    the kernel has none of them (bpftool as the witness)."""
    for who, held in scenario.held.items():
        assert held[0], f"{who}: no BPF programs seen while it ran"
        progs, links = still_attached(held)
        assert not progs and not links, f"{who} left programs {progs} and links {links} after exit"
