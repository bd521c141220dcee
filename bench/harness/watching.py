"""The cost of watching (issue 12): what an observer of the TCP lifecycle costs
the work it watches, and the work it does not.

    python3 bench/harness/run.py watching [--smoke] [--runs N] [--rate 4000]

Four measurements, every one a ratio to a baseline taken in the same run, with
the conditions interleaved and their order rotated each round:

1. CPU per connection at a fixed rate below saturation (``--rate``, default
   4,000 connections/s) on two loads: nginx without keep-alive driven by
   ``churn http`` (HTTP/1.0 GET, read to EOF, paced), and the epoll pair
   (``churn server`` + paced ``churn client``).  Conditions: off, ``tracer
   watch`` (defaults, output to a file), ``tracer export`` (defaults, scraped
   every 5 s), the bpftrace one-liner ``lifetime.bt``, and libbpf-tools
   ``tcplife`` and ``tcpstates`` (output to a file).  CPU is the scheduler
   runtime of every process involved: the load generator (its own
   CLOCK_PROCESS_CPUTIME_ID), the server (nginx master and workers), and the
   observer (/proc/PID/task/*/schedstat).  BPF programs run in the context of
   the task that hit the hook, so their time is in the load's CPU; softirq
   work deferred to ksoftirqd is recorded beside it, not summed.
2. Saturation throughput: ``ab -c 16`` against the same nginx and the
   unpaced epoll pair, off / watch / export, per-round on/off ratios.
3. The tax on unrelated work: ``syscalls.c`` loops (getppid, open+close of a
   regular file, pipe write+read), ns per operation by the thread's CPU clock.
4. The observer's own CPU: at the fixed rate (from 1.) and idle with N live
   sockets held by ``churn hold`` (default 100k).

/proc/stat is not used: it is tick-sampled here and under-reads a paced load.
Only the processes this benchmark starts are measured; the host is shared.
Every process started here is stopped by pid on every exit path, and every
wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lib import (  # noqa: E402
    CLK_TCK,
    HERE,
    TRACER,
    BenchError,
    Proc,
    build_c,
    children,
    log,
    rss_kib,
    scale_limits,
    start_bpftrace,
    start_nginx,
    stats,
)

if TYPE_CHECKING:
    from run import Bench

# floor: empty programs on the hooks pytracer uses here (floor.py): the cost of attaching anything at all.
# BENCH_BEFORE_TRACER names another build's `tracer` (e.g. the tree before a change, installed with
# `make install PREFIX=/opt/pt-before BINDIR=`): its watch and export then run as two more conditions,
# interleaved with the rest, so before and after come from one run.  BENCH_BEFORE_LABEL says what that build is.
BEFORE_TRACER = os.environ.get("BENCH_BEFORE_TRACER", "")
BEFORE_LABEL = os.environ.get("BENCH_BEFORE_LABEL", "before")
_BEFORE = ("watch_before", "export_before") if BEFORE_TRACER else ()
CONDITIONS = ("off", "floor", "watch", "export", *_BEFORE, "bpftrace", "tcplife", "tcpstates")
TRACERS = ("watch", "export", *_BEFORE)  # the product's two long-running commands (and the other build's)
# In the saturation rounds only: `tracer watch` stopped (SIGSTOP) once it has attached, so its programs
# run and its user space does not; with the floor and `watch` whole, it says whose a loss is.
KERNEL_ONLY = "watch_kernel"


def base_of(cond: str) -> str:
    """watch_before -> watch: what a condition runs, whichever build runs it."""
    return cond.removesuffix("_before")
DEFAULT_RATE = 4000  # connections/s: below saturation for both loads on this 2-core host
FIXED_WINDOW_S = 8.0  # seconds of load per fixed-rate run ...
# ... except `tracer export`, whose background leak scan runs every --leak-interval (default 15 s): a window of
# one full interval holds exactly one scan whatever its phase, so the scan is amortised as in steady state.
EXPORT_WINDOW_S = 15.0
SCRAPE_EVERY_S = 5.0  # the harness plays Prometheus
SETTLE_S = 1.0  # after an observer is ready (attached, seeded, first report or scrape), before measuring
SMOKE_SETTLE_S = 0.2
IDLE_WINDOW_S = 10.0
IDLE_AFTER_S = 300.0  # tracer's default --idle-after: the idle rounds end before the held sockets cross it
IDLE_SOCKETS = 100000
SAT_AB_N = 60000  # ~2 s each at saturation here
SAT_EPOLL_N = 60000
SYSCALL_N = 100000  # operations per batch
SYSCALL_BATCHES = 5
CLIENT_CONC = 64


def build_syscalls() -> str:
    return build_c("syscalls")


def libbpf_tool(name: str) -> str | None:
    """A libbpf-tools binary (Debian's libbpf-tools installs /usr/sbin/tcplife ...)."""
    for cand in (name, f"libbpf-{name}", f"bpf-{name}"):
        path = shutil.which(cand) or (f"/usr/sbin/{cand}" if os.access(f"/usr/sbin/{cand}", os.X_OK) else None)
        if path:
            return path
    return None


# -- CPU of the processes involved -----------------------------------------------------------------------------


def _stat_ticks(path: str) -> int:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_reading(pid: int) -> dict[str, Any]:
    """A process's CPU now: each live task's scheduler runtime (schedstat field 1, ns, exact) and the
    process's utime+stime (clock ticks; it also counts threads that have exited)."""
    tasks: dict[int, int] = {}
    task_ticks = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                tasks[int(tid)] = int(f.read().split()[0])
            task_ticks += _stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except (OSError, ValueError, IndexError):
            continue  # the thread just exited
    return {"tasks": tasks, "ticks": _stat_ticks(f"/proc/{pid}/stat"), "task_ticks": task_ticks}


def cpu_delta_s(a: dict[str, Any], b: dict[str, Any]) -> float:
    """CPU seconds between two readings of one process.  Exact (schedstat) while its threads stay the same;
    a thread that exits in between takes its schedstat with it, so then the process's utime+stime delta (tick
    resolution) is used where it is larger."""
    exact = sum(ns - a["tasks"].get(tid, 0) for tid, ns in b["tasks"].items()) / 1e9
    if set(a["tasks"]) - set(b["tasks"]):
        return max(exact, (b["ticks"] - a["ticks"]) / CLK_TCK)
    return exact


def ksoftirqd_pids() -> list[int]:
    """The per-CPU softirq threads: loopback softirq work lands there when it is deferred, and is then
    nobody's CPU in the sum.  Recorded beside the sum (it also carries other tenants' softirqs)."""
    out = []
    for name in children(2):
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().startswith("ksoftirqd/"):
                    out.append(name)
        except OSError:
            continue
    return out


def sockstat() -> dict[str, int]:
    """Host TCP socket counts (/proc/net/sockstat): other tenants' sockets change what a host-wide tracer
    does, so each run records them."""
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                f = line.split()[1:]
                return {f[i]: int(f[i + 1]) for i in range(0, len(f) - 1, 2)}
    except OSError:
        pass
    return {}


def tcp_opens() -> int:
    """ActiveOpens + PassiveOpens of this network namespace (/proc/net/snmp): less twice this benchmark's
    connections, the other tenants' connection rate that a host-wide observer also pays for."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Tcp:")]
        row = dict(zip(lines[0][1:], lines[1][1:]))
        return int(row["ActiveOpens"]) + int(row["PassiveOpens"])
    except (OSError, IndexError, KeyError, ValueError):
        return 0


def bpf_stats_sysctl() -> str:
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    except OSError:
        return "?"


# -- observers ---------------------------------------------------------------------------------------------------


class Observer:
    """One condition running: its process (None for off), a scraper for export, and stop()."""

    def __init__(self, cond: str, proc: Proc | None = None, out: Path | None = None) -> None:
        self.cond = cond
        self.proc = proc
        self.out = out
        self.scrape_s: list[float] = []
        self.scrape_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def scrape_every(self, url: str, every_s: float) -> None:
        def run() -> None:
            while not self._stop.wait(every_s):
                t0 = time.perf_counter()
                try:
                    urllib.request.urlopen(url, timeout=30).read()
                    self.scrape_s.append(time.perf_counter() - t0)
                except OSError:
                    self.scrape_errors += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def lost_events(self) -> int | None:
        """libbpf-tools print "lost N events on CPU #c" when their perf buffer overflows."""
        if not self.out or self.cond not in ("tcplife", "tcpstates"):
            return None
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        text += self.proc.stderr if self.proc else ""
        return sum(int(n) for n in re.findall(r"lost (\d+) events", text))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=35)
        if self.proc:
            if self.cond == KERNEL_ONLY and self.proc.p.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.stop(signal.SIGINT)


def _wait(pred: Callable[[], bool], proc: Proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.p.poll() is not None:
            time.sleep(0.1)  # let the stderr reader finish
            raise BenchError(f"{proc.name} exited ({proc.p.returncode}) before {what}: {proc.stderr.strip()[-300:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name}: not {what} within {timeout:.0f}s")
        time.sleep(0.05)


def _has_bpf_link(pid: int) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf_link" for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def start_observer(cond: str, tmp: Path, port: int, timeout: float = 120) -> Observer:
    """Start one condition and return once it is attached (and, for the tracer, seeded)."""
    if cond == "off":
        return Observer(cond)
    if cond == "bpftrace":
        return Observer(cond, start_bpftrace(HERE / "lifetime.bt", timeout=timeout))
    if cond == KERNEL_ONLY:
        obs = start_observer("watch", tmp, port, timeout)
        assert obs.proc is not None
        obs.cond = cond
        os.kill(obs.proc.pid, signal.SIGSTOP)
        return obs
    if cond == "floor":
        proc = Proc([sys.executable, str(HERE / "floor.py")], name="floor")
        try:
            proc.wait_for(lambda x: x == "ready", timeout)
        except BaseException:
            proc.stop()
            raise
        return Observer(cond, proc)
    out = tmp / f"{cond}.out"
    base = base_of(cond)
    tracer = BEFORE_TRACER if cond in _BEFORE else TRACER
    if base == "watch":
        argv = [tracer, "watch"]
    elif base == "export":
        argv = [tracer, "export", "--listen", f"127.0.0.1:{port}"]
    else:
        tool = libbpf_tool(cond)
        if not tool:
            raise BenchError(f"{cond} not found")
        argv = [tool]
    obs = Observer(cond, Proc(argv, stdout_file=str(out), stdin=False, name=cond), out)
    try:
        assert obs.proc is not None
        if base == "watch":
            # The first report is written after attach, seeding and one interval.
            _wait(lambda: out.stat().st_size > 0, obs.proc, timeout, "reporting")
        elif base == "export":
            url = f"http://127.0.0.1:{port}/metrics"

            def served() -> bool:
                try:
                    urllib.request.urlopen(url, timeout=5).read()
                    return True
                except OSError:
                    return False

            _wait(served, obs.proc, timeout, f"serving {url}")
            obs.scrape_every(url, SCRAPE_EVERY_S)
        else:
            pid = obs.proc.pid
            _wait(lambda: _has_bpf_link(pid), obs.proc, timeout, "attached")
            time.sleep(0.3)  # its remaining links and the perf buffer
    except BaseException:
        obs.stop()
        raise
    return obs


def rotate(conds: list[str], r: int) -> list[str]:
    """Round r's order: rotated so no condition always runs first or after the same one."""
    k = r % len(conds)
    return conds[k:] + conds[:k]


def ratio_stats(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return stats([x[key] for x in rows if x.get(key) is not None])


# -- the section -----------------------------------------------------------------------------------------------


class Watching:
    def __init__(self, bench: Bench, rate: float, runs: int) -> None:
        self.b = bench
        self.smoke = bench.smoke
        self.rate = rate
        self.rounds = runs or (1 if self.smoke else 6)
        self.pairs = runs or (1 if self.smoke else 7)
        self.settle_s = SMOKE_SETTLE_S if self.smoke else SETTLE_S
        self.syscalls = build_syscalls()
        self.tmp = Path(tempfile.mkdtemp(prefix="pytracer-watching-"))
        self.skipped: dict[str, str] = {}
        self.conds = [c for c in CONDITIONS if base_of(c) != "export" or bench.have_export]
        if not bench.have_export:
            self.skipped["export"] = f"{TRACER} has no export command"
        for tool in ("tcplife", "tcpstates"):
            if not libbpf_tool(tool):
                why = (f"libbpf-tools `{tool}` not installed (Debian 12: apt-get install libbpf-tools; "
                       "bench/harness/install-deps --full)")
                log(f"watching: skipping {tool}: {why}")
                self.skipped[tool] = why
                self.conds.remove(tool)
        self.tracers = [c for c in TRACERS if c in self.conds]
        self.ksoftirqd = ksoftirqd_pids()
        self.out: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            self.out = {"rate": self.rate, "rounds": self.rounds, "pairs": self.pairs, "skipped": self.skipped,
                        "conditions": self.conds, "commands": self.commands(),
                        "tools": {c: libbpf_tool(c) for c in ("tcplife", "tcpstates")}}
            # Idle first, before the fixed-rate runs fill the host with TIME_WAIT.
            self.out["idle"] = self.idle()
            self.out["syscalls"] = self.syscall_tax()
            self.out["fixed_rate"] = self.fixed_rate()
            self.out["saturation"] = self.saturation()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.out["elapsed_s"] = time.monotonic() - t0
        return self.out

    def commands(self) -> dict[str, str]:
        r = f"{self.rate:g}"
        win = 1.0 if self.smoke else FIXED_WINDOW_S
        n = f"{int(self.rate * win)}"  # {int(self.rate * EXPORT_WINDOW_S)} under export
        return {
            "section": "python3 bench/harness/run.py watching" + (" --smoke" if self.smoke else "")
                       + (f" --rate {r}" if self.rate != DEFAULT_RATE else ""),
            "nginx": f"churn http 127.0.0.1 PORT {n} {CLIENT_CONC} {r}  # nginx, 1 worker, keepalive_timeout 0",
            "epoll": f"churn server 127.0.0.1 PORT; churn client 127.0.0.1 PORT {n} {CLIENT_CONC} {r}",
            "off": "(no observer)",
            "watch": "tracer watch > FILE",
            KERNEL_ONLY: "tracer watch > FILE, then kill -STOP once it reports (saturation rounds only)",
            **({"watch_before": f"{BEFORE_TRACER} watch > FILE  # {BEFORE_LABEL}",
                "export_before": f"{BEFORE_TRACER} export --listen 127.0.0.1:PORT  # {BEFORE_LABEL}, scraped as export"}
               if BEFORE_TRACER else {}),
            "export": f"tracer export --listen 127.0.0.1:PORT, GET /metrics every {SCRAPE_EVERY_S:g} s",
            "bpftrace": "bpftrace bench/harness/lifetime.bt",
            "floor": "python3 bench/harness/floor.py  # empty tp_btf programs on pytracer's hooks here",
            "tcplife": "tcplife > FILE  # libbpf-tools",
            "tcpstates": "tcpstates > FILE  # libbpf-tools",
            "saturation": f"ab -q -n {SAT_AB_N} -c 16 http://127.0.0.1:PORT/ (nginx above); "
                          f"churn client 127.0.0.1 PORT {5000 if self.smoke else SAT_EPOLL_N} {CLIENT_CONC} 0",
            "syscalls": f"syscalls {20000 if self.smoke else SYSCALL_N} {SYSCALL_BATCHES} TMPDIR"
                        "  # bench/harness/syscalls.c",
            "idle": "churn hold 127.0.x.y PORT K (N live sockets in all), then the observer alone "
                    f"for {1 if self.smoke else IDLE_WINDOW_S:g} s ({1 if self.smoke else EXPORT_WINDOW_S:g} s for "
                    f"export, scraped every {SCRAPE_EVERY_S:g} s)",
        }

    # -- servers -----------------------------------------------------------------------------------------------

    def nginx(self, port: int) -> Proc:
        d = self.tmp / f"nginx-{port}"
        d.mkdir()
        return start_nginx(d, port, keepalive=False)

    def start_server(self, load: str, port: int) -> tuple[Proc, Callable[[], list[int]]]:
        if load == "nginx":
            p = self.nginx(port)
            return p, lambda: [p.pid, *children(p.pid)]
        p = self.b.server(port)
        return p, lambda: [p.pid]

    # -- 1. CPU per connection at a fixed rate ------------------------------------------------------------------

    def fixed_rate(self) -> dict[str, Any]:
        window = 1.0 if self.smoke else FIXED_WINDOW_S
        export_window = 1.0 if self.smoke else EXPORT_WINDOW_S
        out: dict[str, Any] = {"window_s": window, "export_window_s": export_window}
        # --smoke: nginx only (the epoll pair is still driven by the saturation runs).
        for load in ("nginx",) if self.smoke else ("nginx", "epoll"):
            conds = self.conds
            port = self.b.next_port()
            srv, server_pids = self.start_server(load, port)
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in conds}
            try:
                log(f"watching: CPU per connection, {load} at {self.rate:g}/s, {self.rounds} rounds of "
                    f"{', '.join(conds)}")
                for r in range(self.rounds):
                    for cond in rotate(conds, r):
                        w = export_window if base_of(cond) == "export" else window
                        row = self._fixed_run(load, cond, port, server_pids, int(self.rate * w))
                        row["round"] = r
                        runs[cond].append(row)
                        log(f"  {load} r{r} {cond:9s} {row['cpu_us_per_conn']:6.1f} µs/conn at "
                            f"{row['rate']:,.0f}/s, observer {row['observer_cpu_pct']:.2f}% of a core"
                            + (f", {row['lost_events']} events lost" if row.get("lost_events") else ""))
            finally:
                srv.stop()
            out[load] = self._fixed_summary(runs)
        return out

    def _fixed_run(self, load: str, cond: str, port: int, server_pids: Callable[[], list[int]],
                   n: int) -> dict[str, Any]:
        obs = start_observer(cond, self.tmp, self.b.next_port())
        try:
            time.sleep(self.settle_s)
            socks = sockstat()
            server = server_pids()
            watched = server + obs.pids + self.ksoftirqd
            r0 = {pid: cpu_reading(pid) for pid in watched}
            opens0 = tcp_opens()
            t0 = time.monotonic()
            cli = Proc([self.b.churn, "http" if load == "nginx" else "client", "127.0.0.1", str(port), str(n),
                        str(CLIENT_CONC), str(self.rate)], name=f"churn-{load}-client")
            try:
                res = self.b.client_result(cli, timeout=n / self.rate * 4 + 60)
            finally:
                cli.stop()
            wall = time.monotonic() - t0
            r1 = {pid: cpu_reading(pid) for pid in watched}
            others = tcp_opens() - opens0 - 2 * (res["completed"] + res["errors"])
            socks_end = sockstat()
        finally:
            obs.stop()
        d = {pid: cpu_delta_s(r0[pid], r1[pid]) for pid in watched}
        done = max(1, res["completed"])
        server_s = sum(d[p] for p in server)
        observer_s = sum(d[p] for p in obs.pids)
        total_s = res["cpu_s"] + server_s + observer_s
        return {
            "completed": res["completed"], "errors": res["errors"], "rate": res["completed"] / res["elapsed_s"],
            "wall_s": wall,
            "cpu_us_per_conn": total_s / done * 1e6,
            "client_us_per_conn": res["cpu_s"] / done * 1e6,
            "server_us_per_conn": server_s / done * 1e6,
            "observer_us_per_conn": observer_s / done * 1e6,
            "observer_cpu_pct": observer_s / wall * 100,
            "ksoftirqd_us_per_conn": sum(d[p] for p in self.ksoftirqd) / done * 1e6,
            "lost_events": obs.lost_events(),
            "scrapes": len(obs.scrape_s), "scrape_errors": obs.scrape_errors,
            "other_opens_per_s": max(0, others) / wall,
            "host_tcp": socks, "host_tcp_end": socks_end, "bpf_stats_enabled": bpf_stats_sysctl(),
            # Live TCP sockets on the host beside this run's listeners: a host-wide observer pays for each.
            "other_live_sockets": max(socks.get("inuse", 0), socks_end.get("inuse", 0)) - len(server) - 1,
        }

    @staticmethod
    def _fixed_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        off = {x["round"]: x for x in runs["off"]}
        out: dict[str, Any] = {}
        for cond, rows in runs.items():
            for x in rows:
                base = off.get(x["round"])
                if base and cond != "off":
                    x["added_us_per_conn"] = x["cpu_us_per_conn"] - base["cpu_us_per_conn"]
                    x["ratio_to_off"] = x["cpu_us_per_conn"] / base["cpu_us_per_conn"]
            out[cond] = {
                **{k: ratio_stats(rows, k) for k in (
                    "cpu_us_per_conn", "added_us_per_conn", "ratio_to_off", "client_us_per_conn",
                    "server_us_per_conn", "observer_us_per_conn", "observer_cpu_pct", "ksoftirqd_us_per_conn",
                    "rate", "lost_events", "other_opens_per_s", "other_live_sockets")},
                "errors": sum(x["errors"] for x in rows),
                "runs": rows,
            }
        return out

    # -- 2. saturation throughput ---------------------------------------------------------------------------------

    def saturation(self) -> dict[str, Any]:
        # The floor too: what attaching anything to these events costs at
        # saturation bounds what any observer of them can reach.
        conds = ["off", *(["floor"] if "floor" in self.conds else []),
                 *([KERNEL_ONLY] if "watch" in self.tracers else []), *self.tracers]
        loads = ["epoll"] if self.smoke or not shutil.which("ab") else ["ab", "epoll"]
        if "ab" not in loads and not self.smoke:
            self.skipped["saturation ab"] = "ab not installed (apache2-utils: bench/harness/install-deps --full)"
            log(f"watching: skipping saturation ab: {self.skipped['saturation ab']}")
        out: dict[str, Any] = {}
        for load in loads:
            port = self.b.next_port()
            srv, _ = self.start_server("nginx" if load == "ab" else "epoll", port)
            rows: dict[str, list[float]] = {c: [] for c in conds}
            try:
                log(f"watching: saturation, {load}, {self.pairs} rounds of {', '.join(conds)}")
                for r in range(self.pairs):
                    for cond in rotate(conds, r):
                        obs = start_observer(cond, self.tmp, self.b.next_port())
                        try:
                            time.sleep(self.settle_s / 2)
                            rps = self._saturate(load, port)
                        finally:
                            obs.stop()
                        rows[cond].append(rps)
                    log(f"  {load} r{r} " + " ".join(f"{c} {rows[c][-1]:,.0f}/s" for c in conds))
            finally:
                srv.stop()
            out[load] = {c: {"rps": stats(rows[c]), "rps_runs": rows[c],
                             **({"ratio": stats([x / y for x, y in zip(rows[c], rows["off"])]),
                                 "ratio_runs": [x / y for x, y in zip(rows[c], rows["off"])]} if c != "off" else {})}
                         for c in conds}
        return out

    def _saturate(self, load: str, port: int) -> float:
        if load == "ab":
            res = subprocess.run(["ab", "-q", "-n", str(SAT_AB_N), "-c", "16", f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True, timeout=300)
            for line in res.stdout.splitlines():
                if line.startswith("Requests per second:"):
                    return float(line.split()[3])
            raise BenchError("ab printed no requests/s: " + (res.stdout + res.stderr)[-300:])
        n = 5000 if self.smoke else SAT_EPOLL_N
        cli = Proc([self.b.churn, "client", "127.0.0.1", str(port), str(n), str(CLIENT_CONC), "0"],
                   name="churn-client")
        try:
            res = self.b.client_result(cli, timeout=300)
        finally:
            cli.stop()
        return res["completed"] / res["elapsed_s"]

    # -- 3. the tax on unrelated work ---------------------------------------------------------------------------

    def syscall_tax(self) -> dict[str, Any]:
        conds = ["off", *self.tracers]
        n = 20000 if self.smoke else SYSCALL_N
        rows: dict[str, list[dict[str, float]]] = {c: [] for c in conds}
        log(f"watching: syscall loops, {self.pairs} rounds of {', '.join(conds)}")
        for r in range(self.pairs):
            for cond in rotate(conds, r):
                obs = start_observer(cond, self.tmp, self.b.next_port())
                try:
                    time.sleep(self.settle_s / 2)
                    res = subprocess.run([self.syscalls, str(n), str(SYSCALL_BATCHES), str(self.tmp)],
                                         capture_output=True, text=True, timeout=300, check=True)
                finally:
                    obs.stop()
                d = json.loads(res.stdout)
                # The median batch by the thread's CPU clock; wall-clock figures kept beside it.
                rows[cond].append({f"{loop}_{clk}_ns": stats(d[f"{loop}_{clk}_ns"])["median"]
                                   for loop in ("getppid", "openclose", "pipe") for clk in ("cpu", "wall")})
            log(f"  r{r} " + "; ".join(f"{c} getppid {rows[c][-1]['getppid_cpu_ns']:.0f} open+close "
                                       f"{rows[c][-1]['openclose_cpu_ns']:.0f} pipe {rows[c][-1]['pipe_cpu_ns']:.0f} ns"
                                       for c in conds))
        out: dict[str, Any] = {"ops_per_batch": n, "batches": SYSCALL_BATCHES}
        for cond in conds:
            c: dict[str, Any] = {"runs": rows[cond]}
            for key in rows[cond][0]:
                c[key] = stats([x[key] for x in rows[cond]])
                if cond != "off":
                    c[key.replace("_ns", "_ratio")] = stats([x[key] / y[key] for x, y in zip(rows[cond], rows["off"])])
            out[cond] = c
        return out

    # -- 4. the observer's own CPU when idle with N live sockets ------------------------------------------------

    def idle(self) -> dict[str, Any]:
        sockets = 2000 if self.smoke else IDLE_SOCKETS
        window = 1.0 if self.smoke else IDLE_WINDOW_S
        export_window = 1.0 if self.smoke else EXPORT_WINDOW_S
        lim = scale_limits()
        per_proc = lim["connections_per_holder"]
        holders: list[Proc] = []
        rows: dict[str, list[dict[str, Any]]] = {c: [] for c in self.tracers}
        # The same observers before any socket is held: the RSS the live sockets add is over this.
        empty: dict[str, dict[str, int | None]] = {}
        for cond in self.tracers:
            obs = start_observer(cond, self.tmp, self.b.next_port(), timeout=300)
            try:
                time.sleep(self.settle_s + (export_window if base_of(cond) == "export" else window))
                assert obs.proc is not None
                rss = rss_kib(obs.proc.pid)
                empty[cond] = {"rss_kib": rss.get("VmRSS"), "hwm_kib": rss.get("VmHWM")}
            finally:
                obs.stop()
            log(f"  idle, no held sockets, {cond}: RSS {(empty[cond]['rss_kib'] or 0) / 1024:.0f} MiB, "
                f"peak {(empty[cond]['hwm_kib'] or 0) / 1024:.0f} MiB")
        try:
            left, i = sockets // 2, 0
            t0 = time.monotonic()
            while left > 0:
                k = min(per_proc, left)
                i += 1
                holders.append(Proc([self.b.churn, "hold", f"127.0.{10 + i // 250}.{1 + i % 250}",
                                     str(self.b.next_port()), str(k)], name="churn-hold"))
                left -= k
            for h in holders:
                h.wait_for(lambda x: isinstance(x, dict) and x.get("role") == "hold", 300)
            log(f"watching: idle with {sockets:,} live sockets ({len(holders)} holders, opened in "
                f"{time.monotonic() - t0:.1f}s), {self.rounds} rounds of {', '.join(self.tracers)}")
            held_t0 = time.monotonic()
            per_round = sum(self.settle_s + (export_window if base_of(c) == "export" else window) + 4
                            for c in self.tracers)
            for r in range(self.rounds):
                # Held sockets idle past the default --idle-after (300 s) would all be flagged: a leak
                # pile, another regime (bench/notes.md).  Stop before the round that would cross it.
                if r and time.monotonic() - held_t0 + per_round > IDLE_AFTER_S - 20:
                    log(f"watching: idle stops after {r} rounds: the held sockets would be idle past "
                        f"--idle-after ({IDLE_AFTER_S:.0f} s) and be flagged")
                    self.out.setdefault("notes", []).append(f"idle: {r} rounds (held sockets kept under "
                                                            f"--idle-after {IDLE_AFTER_S:.0f} s)")
                    break
                for cond in rotate(list(self.tracers), r):
                    w = export_window if base_of(cond) == "export" else window
                    obs = start_observer(cond, self.tmp, self.b.next_port(), timeout=300)
                    try:
                        time.sleep(self.settle_s)
                        assert obs.proc is not None
                        pid = obs.proc.pid
                        a, t = cpu_reading(pid), time.monotonic()
                        time.sleep(w)
                        b, wall = cpu_reading(pid), time.monotonic() - t
                        rss = rss_kib(pid)
                    finally:
                        obs.stop()
                    base = empty.get(cond, {}).get("hwm_kib")
                    rows[cond].append({"cpu_pct": cpu_delta_s(a, b) / wall * 100, "window_s": wall,
                                       "rss_kib": rss.get("VmRSS"), "hwm_kib": rss.get("VmHWM"),
                                       "added_hwm_kib": (rss["VmHWM"] - base) if base and rss.get("VmHWM")
                                       else None,
                                       "host_tcp": sockstat(), "round": r})
                    log(f"  idle r{r} {cond:6s} {rows[cond][-1]['cpu_pct']:.2f}% of a core, "
                        f"RSS {(rss.get('VmRSS') or 0) / 1024:.0f} MiB")
        finally:
            for h in holders:  # signal every holder first, then reap each
                if h.p.poll() is None:
                    try:
                        os.kill(h.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for h in holders:
                h.stop(timeout=60)
        return {"sockets": sockets, "holders": len(holders), "window_s": window, "export_window_s": export_window,
                "empty": empty,
                **{c: {"cpu_pct": ratio_stats(v, "cpu_pct"), "rss_kib": ratio_stats(v, "rss_kib"),
                       "hwm_kib": ratio_stats(v, "hwm_kib"), "added_hwm_kib": ratio_stats(v, "added_hwm_kib"),
                       "runs": v}
                   for c, v in rows.items()}}
