"""Faults: what survives them, seen through the public CLI, JSON and metrics.

Ground truth is the load generator's own counts (bench/harness/churn.c), an
independent bpftrace script, ``ss`` and ``bpftool``; every process started
here is the test's own, and every assertion is scoped to its pids and ports.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from .conftest import IN_VM, fdinfo_ids, gone, live_prog_ids, tracer_cmd
from .soak import Lines, Oracle, build_churn, free_port, metric_value, wait_for

START_S = 600 if IN_VM else 90
# How long the tracers stay stopped under load.  The property (the kernel
# counts on, one catch-up report) is the same for 30 s; CI uses 8 s.
STOP_S = float(os.environ.get("PYTRACER_FAULT_STOP_S", "8"))


FIGURES = Path(os.environ.get("PYTRACER_RELIABILITY_DIR", "/tmp/pytracer-reliability")) / "faults.jsonl"


def figure(test: str, **values: Any) -> None:
    """Keep a test's measured figures for docs/reliability.md (not asserted on)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as f:
        f.write(json.dumps({"test": test, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **values}) + "\n")


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_churn(tmp_path_factory.mktemp("churn"))


@pytest.fixture
def procs() -> Iterator[list[Lines]]:
    started: list[Lines] = []
    yield started
    for p in started:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait(timeout=30)


class Watch(Lines):
    """`tracer watch --json`, with each line's arrival on the test's clock."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        super().__init__([*tracer_cmd(), "watch", "--json", "--interval", "1", *args],
                         stderr_path=tmp / f"watch-{time.monotonic_ns()}.err",
                         on_line=lambda x: self.arrivals.append((time.monotonic(), json.loads(x))))

    def wait_attached(self) -> None:
        wait_for(lambda: "attached" in self.stderr() or self.p.poll() is not None, START_S, "watch attached")
        assert self.p.poll() is None, self.stderr()
        wait_for(lambda: bool(self.arrivals), 10, "a first report")

    def last(self) -> dict[str, Any]:
        return self.arrivals[-1][1]

    def settle(self, key: str, want: int, timeout: float = 15) -> dict[str, Any]:
        """The first report whose `key` reaches want (or the last one seen)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.arrivals and self.last()[key] >= want:
                break
            time.sleep(0.2)
        time.sleep(1.2)  # one more report: nothing beyond want either
        return self.last()


class Export(Lines):
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        super().__init__([*tracer_cmd(), "export", "--listen", f"127.0.0.1:{self.port}", *args],
                         stderr_path=tmp / f"export-{self.port}.err")

    def wait_attached(self) -> None:
        wait_for(lambda: "serving " in self.stderr() or self.p.poll() is not None, START_S, "export serving")
        assert self.p.poll() is None, self.stderr()

    def scrape(self) -> str:
        return urllib.request.urlopen(self.url, timeout=10).read().decode()

    def totals(self, page: str | None = None) -> tuple[int, int]:
        page = page or self.scrape()
        return tuple(int(sum(metric_value(page, f"pytracer_connections_{w}_total", f'direction="{d}"')
                             for d in ("active", "passive"))) for w in ("opened", "closed"))  # type: ignore[return-value]


def pid_args(*procs: Lines) -> list[str]:
    return [a for p in procs for a in ("--pid", str(p.p.pid))]


def start_server(churn: str, procs: list[Lines]) -> tuple[Lines, int]:
    port = free_port()
    server = Lines([churn, "server", "127.0.0.1", str(port)], stdin=True)
    procs.append(server)
    wait_for(lambda: any('"ready"' in x for x in server.lines), 10, "churn server ready")
    return server, port


def start_client(churn: str, port: int, n: int, rate: int, procs: list[Lines]) -> Lines:
    """A paced churn client that waits for go() before its first connection."""
    c = Lines([churn, "client", "127.0.0.1", str(port), str(n), "16", str(rate)], stdin=True,
              env={"CHURN_WAIT": "1"})
    procs.append(c)
    return c


def start_oracle(port: int, procs: list[Any]) -> Oracle:
    """bpftrace counting opens and closes on port, in its own maps."""
    o = Oracle((port, port))
    procs.append(o)
    return o


def oracle_counts(o: Oracle, port: int) -> tuple[int, int]:
    """(opened, closed) sockets on port, both sides, as bpftrace counted them."""
    c = o.stop()
    return tuple(c.get(f"{what}:{port}:active", 0) + c.get(f"{what}:{port}:passive", 0)  # type: ignore[return-value]
                 for what in ("open", "close"))


def go(p: Lines) -> None:
    assert p.p.stdin is not None
    p.p.stdin.write("go\n")
    p.p.stdin.flush()


def finish(client: Lines, timeout: float = 120) -> dict[str, Any]:
    """The client's own counts, once every one of its connections is closed.
    Left unreaped (the procs fixture reaps it), so its pid, which the tracers
    watch, cannot go to another process meanwhile."""
    client.reader.join(timeout=timeout)
    assert not client.reader.is_alive(), "client still running"
    out = next(json.loads(x) for x in client.lines if '"role":"client"' in x.replace(" ", ""))
    assert out["errors"] == 0 and out["completed"] == out["started"], out
    return out


# --- SIGSTOP / SIGCONT ---------------------------------------------------------------


def test_sigstop_under_churn_then_sigcont_totals_exact_one_catch_up_report(
        churn: str, procs: list[Lines], tmp_path: Path) -> None:
    """Both tracers stopped for STOP_S while every connection of the load
    happens; after SIGCONT the next scrape and one watch report carry it all."""
    server, port = start_server(churn, procs)
    rate = 500
    client = start_client(churn, port, int(rate * (STOP_S - 2)), rate, procs)
    o = start_oracle(port, procs)
    watch, export = Watch(tmp_path, *pid_args(server, client)), Export(tmp_path, *pid_args(server, client))
    procs += [watch, export]
    watch.wait_attached()
    export.wait_attached()
    wait_for(lambda: len(watch.arrivals) >= 2, 10, "watch reports")
    assert export.totals() == (0, 0)

    for p in (watch, export):
        p.p.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    go(client)
    counts = finish(client, timeout=STOP_S + 60)
    time.sleep(max(0.0, stopped + STOP_S - time.monotonic()))
    n_before = len(watch.arrivals)
    for p in (watch, export):
        p.p.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    want = 2 * counts["completed"]  # the client's sockets and the server's

    # The next scrape, at once: everything the kernel counted while we slept.
    assert export.totals() == (want, want)
    # One catch-up report, not one per missed second.
    wait_for(lambda: len(watch.arrivals) > n_before, 10, "a report after SIGCONT")
    time.sleep(2.5)
    after = [(t, r) for t, r in watch.arrivals[n_before:]]
    first_t, first = after[0]
    assert first["opened"] == want and first["closed"] == want, first
    assert first["interval_seconds"] >= STOP_S - 1, first["interval_seconds"]
    burst = [r for t, r in after[1:] if t - first_t < 0.5]
    assert not burst, f"{len(burst) + 1} reports within 0.5 s of resuming"
    assert len(after) <= 4, f"{len(after)} reports in {time.monotonic() - resumed:.1f} s after resuming"
    assert all(r["opened"] == 0 for _, r in after[1:])

    opened_oracle, closed_oracle = oracle_counts(o, port)
    assert opened_oracle == closed_oracle == want
    assert watch.last()["opened_total"] == watch.last()["closed_total"] == want
    figure("sigstop", stopped_s=round(resumed - stopped, 1), connections=counts["completed"], sockets=want,
           catch_up_interval_s=first["interval_seconds"], reports_in_2_5_s_after=len(after))


# --- two tracers at once -----------------------------------------------------------------


def test_watch_and_export_at_once_both_exact_neither_disturbs_the_other(
        churn: str, procs: list[Lines], tmp_path: Path) -> None:
    """watch runs throughout; export starts after burst 1 and stops after
    burst 2.  watch counts all three bursts, export exactly burst 2."""
    server, port = start_server(churn, procs)
    clients = [start_client(churn, port, 3000, 1500, procs) for _ in range(3)]
    o = start_oracle(port, procs)
    watch = Watch(tmp_path, *pid_args(server, *clients))
    procs.append(watch)
    watch.wait_attached()

    go(clients[0])
    n1 = 2 * finish(clients[0])["completed"]
    export = Export(tmp_path, *pid_args(server, *clients[1:]))  # client 1 has exited
    procs.append(export)
    export.wait_attached()
    watch_ids = fdinfo_ids(watch.p.pid, "prog_id")
    export_ids = fdinfo_ids(export.p.pid, "prog_id")
    assert watch_ids and export_ids and not watch_ids & export_ids
    assert export.totals() == (0, 0)

    go(clients[1])
    n2 = 2 * finish(clients[1])["completed"]
    time.sleep(0.5)
    assert export.totals() == (n2, n2)
    assert watch.settle("closed_total", n1 + n2)["opened_total"] == n1 + n2

    export.p.send_signal(signal.SIGTERM)
    assert export.p.wait(timeout=60) == 0, export.stderr()
    assert gone(export_ids), "export's programs left loaded after it exited"
    assert watch_ids <= live_prog_ids(), "export's exit took watch's programs with it"

    go(clients[2])
    n3 = 2 * finish(clients[2])["completed"]
    last = watch.settle("closed_total", n1 + n2 + n3)
    opened_oracle, closed_oracle = oracle_counts(o, port)
    assert last["opened_total"] == last["closed_total"] == opened_oracle == closed_oracle == n1 + n2 + n3
    # Per-interval counts add up across export's start and stop: nothing counted twice or lost.
    assert sum(r["opened"] for _, r in watch.arrivals) == n1 + n2 + n3
    figure("two_tracers", watch_sockets=n1 + n2 + n3, export_sockets=n2, oracle=opened_oracle)


# --- SIGKILL while seeding 100k sockets --------------------------------------------------


HOLDERS = 6
HOLD_EACH = 8400  # connections per holder: 2 fds each, under the 20,000-fd hard limit here


def test_sigkill_while_seeding_100k_sockets_leaves_nothing_attached(
        churn: str, procs: list[Lines], tmp_path: Path) -> None:
    if 2 * HOLD_EACH + 64 > resource.getrlimit(resource.RLIMIT_NOFILE)[1]:
        pytest.skip("the fd hard limit is below what one holder needs")
    holders = []
    for _ in range(HOLDERS):
        h = Lines([churn, "hold", "127.0.0.1", str(free_port()), str(HOLD_EACH)], stdin=True)
        procs.append(h)
        holders.append(h)
    for h in holders:
        wait_for(lambda h=h: any('"hold"' in x for x in h.lines) or h.p.poll() is not None, 120, "holder")
        assert h.p.poll() is None, h.lines
    n_sockets = 2 * HOLDERS * HOLD_EACH
    ss = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True).stdout
    assert len(ss.splitlines()) >= n_sockets

    # Host-wide, so seeding walks every socket; the kill lands once the
    # programs are attached and before the "attached" line (seeding sits between).
    w = Watch(tmp_path)
    procs.append(w)
    seen_links: set[int] = set()
    seen_progs: set[int] = set()
    seen_maps: set[int] = set()
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and w.p.poll() is None:
        seen_links = fdinfo_ids(w.p.pid, "link_id")
        if seen_links:
            seen_progs = fdinfo_ids(w.p.pid, "prog_id")
            seen_maps = fdinfo_ids(w.p.pid, "map_id")
            w.p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    w.p.wait(timeout=30)
    killed = time.monotonic()
    assert seen_links, "watch never attached"
    assert "attached" not in w.stderr(), "killed after seeding, not during it"

    assert gone(seen_progs), "programs left loaded after SIGKILL"
    freed_s = time.monotonic() - killed
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "list"], capture_output=True, text=True).stdout or "[]")
    assert not {li["id"] for li in links} & seen_links, "links left after SIGKILL"
    # On a busy host the maps outlive their programs for a while (see gone()).
    assert gone(set(), maps=seen_maps, timeout=30), "maps left 30 s after SIGKILL"
    maps_freed_s = time.monotonic() - killed

    # The next start is clean: it attaches, seeds the same sockets and counts them exactly.
    nxt = Watch(tmp_path, "--duration", "2", *pid_args(*holders))
    procs.append(nxt)
    assert nxt.p.wait(timeout=START_S) == 0, nxt.stderr()
    nxt.reader.join(timeout=10)
    assert nxt.last()["states"].get("ESTABLISHED") == n_sockets, nxt.last()["states"]
    figure("sigkill_seeding", sockets=n_sockets, progs=len(seen_progs), links=len(seen_links), maps=len(seen_maps),
           freed_within_s=round(freed_s, 2), maps_freed_within_s=round(maps_freed_s, 2),
           next_start_established=n_sockets)


# --- a full socket table -------------------------------------------------------------------


FULL_CAPACITY = 1024
FULL_CONNS = 1500  # 3,000 sockets and a listener, for a table of 1,024


def _live_output(argv: list[str], seconds: float) -> str:
    """What the live (terminal) view printed, run under a pseudo-terminal."""
    r = subprocess.run(["script", "-qfec", " ".join(argv), "/dev/null"], capture_output=True, text=True,
                       timeout=seconds + START_S, env={**os.environ, "COLUMNS": "250", "LINES": "80"})
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", r.stdout)


def test_full_table_warns_everywhere_and_clears_when_sockets_close(
        churn: str, procs: list[Lines], tmp_path: Path) -> None:
    port = free_port()
    holder = Lines([churn, "hold", "127.0.0.1", str(port), str(FULL_CONNS)], stdin=True, env={"CHURN_WAIT": "1"})
    late = Lines([churn, "hold", "127.0.0.1", str(free_port()), "100"], stdin=True, env={"CHURN_WAIT": "1"})
    procs += [holder, late]
    cap = ("--max-sockets", str(FULL_CAPACITY), *pid_args(holder, late))
    watch = Watch(tmp_path, *cap)
    plain = Lines([*tracer_cmd(), "watch", "--interval", "1", *cap], stderr_path=tmp_path / "plain.err")
    export = Export(tmp_path, *cap)
    procs += [watch, plain, export]
    watch.wait_attached()
    export.wait_attached()
    wait_for(lambda: "attached" in plain.stderr(), START_S, "plain watch attached")
    assert not watch.last()["warnings"]
    assert metric_value(export.scrape(), "pytracer_socket_table_full") == 0

    go(holder)
    wait_for(lambda: any('"hold"' in x for x in holder.lines), 60, "holder connected")
    ss = subprocess.run(["ss", "-Htn", f"( sport = :{port} or dport = :{port} )"], capture_output=True, text=True)
    n_ss = len(ss.stdout.splitlines())
    assert n_ss == 2 * FULL_CONNS, n_ss  # the test's own count, seen by ss
    time.sleep(2.2)

    rep = watch.last()
    assert rep["tracer"]["map_entries"] == FULL_CAPACITY < n_ss
    assert rep["tracer"]["table_full"] and rep["tracer"]["insert_failed"] >= n_ss - FULL_CAPACITY
    assert len(rep["warnings"]) == 1 and "socket table full" in rep["warnings"][0], rep["warnings"]
    assert "--max-sockets" in rep["warnings"][0]
    assert any("WARNING: socket table full" in x for x in plain.lines[-40:]), plain.lines[-40:]
    page = export.scrape()
    assert metric_value(page, "pytracer_socket_table_full") == 1
    assert metric_value(page, "pytracer_map_entries", 'map="socks"') == FULL_CAPACITY

    # One-shot commands see the same: leaks (its own table, seeding fails), doctor (the running ones).
    leaks = subprocess.run([*tracer_cmd(), "leaks", "--json", *cap], capture_output=True,
                           text=True, timeout=START_S)
    out = json.loads(leaks.stdout)
    assert out["table"]["table_full"] and "socket table full" in out["warnings"][0], out.get("warnings")
    leaks_text = subprocess.run([*tracer_cmd(), "leaks", *cap], capture_output=True,
                                text=True, timeout=START_S)
    assert leaks_text.stdout.startswith("WARNING: socket table full"), leaks_text.stdout[:300]
    doctor = subprocess.run([*tracer_cmd(), "doctor"], capture_output=True, text=True, timeout=START_S)
    assert re.search(rf"WARNING: tracer watch \(pid {watch.p.pid}\): socket table full", doctor.stdout), doctor.stdout
    live = _live_output([*tracer_cmd(), "watch", "--duration", "2.5", *cap], 2.5)
    assert "WARNING: socket table full" in live, live[-2000:]

    # Fresh failures (a second holder connects into the full table), then every socket closes:
    # the table empties at once, and the warning clears once no insert failed for RECENT_S (10 s).
    go(late)
    wait_for(lambda: any('"hold"' in x for x in late.lines), 60, "second holder connected")
    n_closing = len(watch.arrivals)
    for h in (holder, late):
        assert h.p.stdin is not None
        h.p.stdin.close()
    for h in (holder, late):
        h.p.wait(timeout=30)
    wait_for(lambda: not watch.last()["warnings"], 30, "the warning to clear")
    rep = watch.last()
    # It clears only once no insert failed for RECENT_S (10 s): room in the table alone is not enough.
    arr = watch.arrivals
    last_fail = max(t for (t, r), (_, p) in zip(arr[1:], arr)
                    if r["tracer"]["insert_failed"] > p["tracer"]["insert_failed"])
    assert last_fail >= arr[n_closing - 1][0] - 1.5, "no fresh failures before the close"
    cleared = next(t for t, r in arr[n_closing:] if not r["warnings"])
    assert cleared >= last_fail + 10 - 1.5, (cleared - last_fail)
    after = arr[n_closing:]
    assert all(r["warnings"] for t, r in after if t < last_fail + 8.5)
    assert rep["tracer"]["map_entries"] < FULL_CAPACITY and not rep["tracer"]["table_full"]
    assert rep["tracer"]["insert_failed"] >= n_ss - FULL_CAPACITY  # the total stays in the figures
    # A scrape looks back to the newest scrape at least 10 s old.
    wait_for(lambda: metric_value(export.scrape(), "pytracer_socket_table_full") == 0, 30, "the gauge to clear")
    figure("full_table", capacity=FULL_CAPACITY, ss_sockets=n_ss, insert_failed=rep["tracer"]["insert_failed"],
           cleared_after_last_failure_s=round(cleared - last_fail, 1))
    assert not any("WARNING" in x for x in plain.lines[-6:]), plain.lines[-6:]


# --- bpffs and tracefs unmounted -------------------------------------------------------------------


def test_unmounted_bpffs_and_tracefs_are_mounted_by_the_tracer(procs: list[Lines]) -> None:
    """In a private mount namespace (the host's mounts stay as they are)."""
    host_before = Path("/proc/self/mountinfo").read_text()
    script = (
        "for m in /sys/kernel/debug/tracing /sys/kernel/tracing /sys/fs/bpf; do "
        "  while mountpoint -q $m; do umount $m || exit 3; done; done; "
        "grep -cE ' (tracefs|bpf) ' /proc/self/mounts; "
        + " ".join(tracer_cmd()) + " watch --json --duration 1.5 --pid $$ || exit 4; "
        "grep -E ' (tracefs|bpf) ' /proc/self/mounts"
    )
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, timeout=START_S)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0", "not unmounted in the namespace"
    assert any(x.startswith("{") for x in lines), r.stdout
    mounted = " ".join(x for x in lines if not x.startswith("{"))
    assert " tracefs " in mounted and " bpf " in mounted, mounted
    assert Path("/proc/self/mountinfo").read_text() == host_before


# --- libbpf too old ------------------------------------------------------------------------------------


def test_old_libbpf_is_one_clear_line(tmp_path: Path) -> None:
    """A 0.x-era library (the 1.0 entry points absent) named by PYTRACER_LIBBPF;
    the missing-library case is test_cli.py::test_missing_libbpf_is_one_line."""
    src = tmp_path / "old.c"
    src.write_text("void *bpf_object__open_mem(void) { return 0; }\n"
                   "int bpf_program__set_autoload(void) { return 0; }\n")
    lib = tmp_path / "libbpf.so.0.3.0"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    for cmd in (["watch", "--duration", "1"], ["export", "--listen", f"127.0.0.1:{free_port()}", "--duration", "1"]):
        r = subprocess.run([*tracer_cmd(), *cmd], capture_output=True, text=True, timeout=START_S,
                           env={**os.environ, "PYTRACER_LIBBPF": str(lib)})
        assert r.returncode != 0, r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "older than libbpf 1.0" in lines[0] and "PYTRACER_LIBBPF" in lines[0], lines[0]


# --- memlock at its limit ---------------------------------------------------------------------------------


def _kernel() -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])  # type: ignore[return-value]


def _has_cap_sys_resource() -> bool:
    m = re.search(r"CapEff:\s+([0-9a-f]+)", Path("/proc/self/status").read_text())
    return bool(m and int(m.group(1), 16) >> 24 & 1)


@pytest.mark.parametrize("drop", [False, True], ids=["as-is", "without-CAP_SYS_RESOURCE"])
def test_memlock_at_its_limit(drop: bool) -> None:
    """RLIMIT_MEMLOCK at 64 KiB.  From 5.11 BPF memory is charged to the
    memory cgroup and the tracer runs.  Before, libbpf raises the limit where
    it may (CAP_SYS_RESOURCE); where it may not, one line says what to do."""
    prefix = ["prlimit", "--memlock=65536:65536", "--"]
    if drop:
        prefix += ["setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource"]
    r = subprocess.run([*prefix, *tracer_cmd(), "watch", "--json", "--duration", "1.5", "--pid", str(os.getpid())],
                       capture_output=True, text=True, timeout=START_S)
    may_raise = _has_cap_sys_resource() and not drop
    if _kernel() >= (5, 11) or may_raise:
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[0])["states"] is not None
    else:
        assert r.returncode == 1, r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "RLIMIT_MEMLOCK" in lines[0] and "ulimit -l" in lines[0], r.stderr
