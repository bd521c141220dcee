"""The soak: hours of traffic compressed into minutes, against the public CLI.

Load: an epoll client/server pair (bench/harness/churn.c, paced) plus nginx
driven by ``ab`` in one-second batches, both at a steady rate on loopback.
Watching it: ``tracer watch --json`` and ``tracer export`` (scraped every
second), each filtered to the load's pids, beside an independent bpftrace
script on ``sock:inet_sock_set_state`` that counts, per port and side, the
opens and closes the kernel made.

Every second the driver samples each tracer's RSS and open fds and times a
scrape.  At the end it compares the tracers' opened/closed totals with the
oracle and with the load generators' own counts, checks the socket table is
back to its baseline, and that RSS and fds stayed flat from minute 2.

    python tests/kernel/soak.py --minutes 21 --churn-rate 1300 --ab-rate 400 --out soak.json

(``make soak``; tests/kernel/test_soak.py runs a 3-minute version.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

try:  # a module of the test package, or a script run from tests/kernel
    from .leaky_support import NGINX_CONF
except ImportError:
    from leaky_support import NGINX_CONF  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHURN_SRC = ROOT / "bench" / "harness" / "churn.c"
# One churn client runs at most this long (churn.c stops a client after 10 minutes).
SEGMENT_S = float(os.environ.get("PYTRACER_SOAK_SEGMENT_S", "300"))


def build_churn(dest: Path) -> str:
    """bench/harness/churn.c (the epoll load generator) built into dest."""
    out = dest / "churn"
    if not out.exists():
        subprocess.run(["gcc", "-O2", "-o", str(out), str(CHURN_SRC)], check=True)
    return str(out)


def tracer_cmd() -> list[str]:
    override = os.environ.get("PYTRACER_SOAK_TRACER")
    if override:
        return override.split()
    exe = shutil.which("tracer")
    return [exe] if exe else [sys.executable, "-m", "pytracer"]


def free_port() -> int:
    # Below the ephemeral range, so a client's source port never equals it.
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = int.from_bytes(os.urandom(2), "little") % (lo - 20000) + 20000
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port below the ephemeral range")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    m = re.search(field + r":\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the ceil(q n)-th smallest (of 100 samples, p99 is the
    99th, not the largest)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample from an exposition page (labels as written, e.g. 'direction="active"')."""
    needle = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    raise KeyError(needle)


def flat(samples: list[tuple[float, int]], after_s: float, tolerance: float = 0.05,
         transient: int = 0) -> dict[str, Any]:
    """Samples after after_s against their first value: within +-tolerance,
    plus at most ``transient`` more while in use (the fds a scrape or a leak
    scan holds for its duration), and back within tolerance by the end (the
    lowest of the last fifth of the samples)?  A leak grows without coming back."""
    tail = [v for t, v in samples if t >= after_s]
    if not tail:
        return {"ok": False, "samples": 0}
    ref = tail[0]
    lo, hi = min(tail), max(tail)
    settled = min(tail[-max(1, len(tail) // 5):])
    ok = lo >= ref * (1 - tolerance) and hi <= ref * (1 + tolerance) + transient and settled <= ref * (1 + tolerance)
    return {"ok": ok, "reference": ref, "min": lo, "max": hi, "settled": settled, "samples": len(tail),
            "spread_pct": round(100 * (hi - lo) / max(ref, 1), 2)}


FD_TRANSIENT = 6  # fds in use at a sample, past the reference, that are not a leak

ORACLE = """
BEGIN { printf("READY\\n"); }
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  if (args->oldstate == 7 && args->newstate == 2 && (args->dport == $1 || args->dport == $2)) {
    @open[args->dport, "active"] = count(); }
  if (args->oldstate == 10 && args->newstate == 3 && (args->sport == $1 || args->sport == $2)) {
    @open[args->sport, "passive"] = count(); }
  if (args->newstate == 7 && args->oldstate != 10) {
    if (args->dport == $1 || args->dport == $2) { @close[args->dport, "active"] = count(); }
    if (args->sport == $1 || args->sport == $2) { @close[args->sport, "passive"] = count(); }
  }
  if (args->sport == $1 || args->sport == $2 || args->dport == $1 || args->dport == $2) {
    if (args->newstate == 7) { delete(@live[args->skaddr]); delete(@where[args->skaddr]); }
    else { @live[args->skaddr] = args->newstate; @where[args->skaddr] = (args->sport, args->dport); }
  }
}
// A socket of the load destroyed before its CLOSE transition: the kernel path
// that would leave a table record behind (the reaper's case), by its last state.
tracepoint:tcp:tcp_destroy_sock /@live[args->skaddr]/ {
  @destroyed_open[@live[args->skaddr]] = count();
  delete(@live[args->skaddr]); delete(@where[args->skaddr]);
}
END { print(@where); clear(@where); print(@live); clear(@live); }
"""


def stop_bpftrace(p: subprocess.Popen, wait_s: float) -> str:
    """Stop a bpftrace oracle the way that lets it print its maps, and say how
    it went: "SIGINT", "SIGINT twice", "SIGTERM", "killed" (no END output),
    or "exited" (it had stopped already).

    A second SIGINT covers a first one that found no handler yet; SIGTERM runs
    the same exit path; a kill is the last resort.  Each step waits a share of
    ``wait_s``, so a slow detach under emulation still gets most of it."""
    if p.poll() is not None:
        return "exited"
    for sig, share, how in ((signal.SIGINT, 0.6, "SIGINT"), (signal.SIGINT, 0.2, "SIGINT twice"),
                            (signal.SIGTERM, 0.2, "SIGTERM")):
        p.send_signal(sig)  # a no-op once it has exited
        try:
            p.wait(timeout=wait_s * share)
            return how
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"bpftrace oracle (pid {p.pid}) still running {wait_s * share:.0f} s after {how}\n")
    p.kill()
    p.wait(timeout=30)
    return "killed"


# What the oracle still held at its end (sockets of the load never seen to close),
# and the sockets destroyed without a CLOSE: printed by the test when a count is off.
UNCLOSED = re.compile(r"@(where|live|destroyed_open)\[")


class Oracle:
    """bpftrace counting, in its own maps (lossless), opens and closes per port and side."""

    def __init__(self, ports: tuple[int, int]) -> None:
        self.p = subprocess.Popen(["bpftrace", "-B", "line", "-e", ORACLE, *map(str, ports)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "BPFTRACE_MAP_KEYS_MAX": "65536"})
        self.unclosed: list[str] = []
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.p.stdout is not None
            for line in self.p.stdout:
                self.lines.append(line)
                if line.startswith("READY"):
                    ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not ready.wait(90):
            self.p.kill()
            raise RuntimeError("bpftrace oracle did not attach in 90 s: " + "".join(self.lines)[-400:])

    def stop(self) -> dict[str, int]:
        self.how = stop_bpftrace(self.p, 120)
        self.reader.join(timeout=30)
        counts: dict[str, int] = {}
        for line in self.lines:
            m = re.match(r'@(open|close)\[(\d+), (\w+)\]: (\d+)', line.strip())
            if m:
                counts[f"{m.group(1)}:{m.group(2)}:{m.group(3)}"] = int(m.group(4))
        self.unclosed = [ln.strip() for ln in self.lines if UNCLOSED.match(ln.strip())][:40]
        return counts


class Lines:
    """A subprocess whose stdout lines a thread collects."""

    def __init__(self, argv: list[str], stdin: bool = False, env: dict[str, str] | None = None,
                 stderr_path: Path | None = None, on_line: Any = None) -> None:
        self.err_path = stderr_path
        err = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL  # noqa: SIM115 - closed with the proc
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                  env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.on_line = on_line
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)
            if self.on_line:
                self.on_line(line)

    def stderr(self) -> str:
        return self.err_path.read_text() if self.err_path else ""

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.lines if x.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait(timeout=30)


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} within {timeout} s")


# Every state a connection of the load can be in, short of TIME-WAIT (a
# minisocket, not in the table) and LISTEN.  Asking the kernel for these only
# matters: a dump that walks tens of thousands of TIME-WAIT sockets while
# they expire can skip a live one (sock_diag resumes a dump by position).
OPEN_STATES = ("established", "syn-sent", "syn-recv", "fin-wait-1", "fin-wait-2", "closed", "close-wait",
               "last-ack", "closing")


def open_on(ports: tuple[int, ...]) -> list[str]:
    """ss lines of the connections to or from ``ports`` still open."""
    flt = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    states = [a for s in OPEN_STATES for a in ("state", s)]
    out = subprocess.run(["ss", "-tanH", *states, f"( {flt} )"], capture_output=True, text=True,
                         timeout=30).stdout
    return [ln for ln in out.splitlines() if ln.split()]


def none_open(ports: tuple[int, ...]) -> bool:
    """No connection on ``ports`` in two dumps in a row, 0.2 s apart."""
    if open_on(ports):
        return False
    time.sleep(0.2)
    return not open_on(ports)


def start_nginx(d: Path, port: int) -> subprocess.Popen:
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=d, keepalive=0, listen=f"127.0.0.1:{port} backlog=4096",
                                      connections=4096))
    p = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(d)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: bool(children(p.pid)), 10, "nginx worker")
    return p


class AbLoop(threading.Thread):
    """``ab`` against nginx, one batch of `rate` requests per second (one connection each)."""

    def __init__(self, url: str, rate: int) -> None:
        super().__init__(daemon=True)
        self.url, self.rate = url, rate
        self.complete = self.failed = self.batches = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        i = 0
        while not self.halt.is_set():
            try:
                r = subprocess.run(["ab", "-q", "-n", str(self.rate), "-c", "1", "-s", "10", self.url],
                                   capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:  # no ab: the verdict says so
                self.errors.append(f"ab: {exc}")
                return
            done = re.search(r"Complete requests:\s+(\d+)", r.stdout)
            failed = re.search(r"Failed requests:\s+(\d+)", r.stdout)
            if done is None:
                self.errors.append((r.stderr or r.stdout)[-300:])
            else:
                self.complete += int(done.group(1))
                self.failed += int(failed.group(1)) if failed else 0
            self.batches += 1
            i += 1
            self.halt.wait(max(0.0, start + i - time.monotonic()))


class ChurnChain(threading.Thread):
    """The churn clients one after another, each told "go" when the previous one exits."""

    def __init__(self, clients: list[Lines]) -> None:
        super().__init__(daemon=True)
        self.clients = clients
        self.results: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        for c in self.clients:
            assert c.p.stdin is not None
            c.p.stdin.write("go\n")
            c.p.stdin.flush()
            # Wait for its stdout to end, not for its exit status: unreaped, its pid
            # stays reserved (pid_max may be 32768), so no later process (an ab
            # batch) can take a pid the tracers watch.  Reaped at the end.
            c.reader.join()
            out = [json.loads(x) for x in c.lines if x.startswith("{") and '"client"' in x]
            if not out:
                self.errors.append(f"client {c.p.pid} exited {c.p.returncode}: {c.stderr()[-300:]}")
                return
            self.results.append(out[-1])


def soak(minutes: float, churn_rate: int, ab_rate: int, out: Path | None = None, log: Any = print) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="pytracer-soak-"))
    churn = build_churn(tmp)
    p_churn, p_http, p_exp = free_port(), free_port(), free_port()
    duration = minutes * 60
    started: list[Any] = []
    result: dict[str, Any] = {"minutes": minutes, "churn_rate": churn_rate, "ab_rate": ab_rate,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "load_before": os.getloadavg()}
    try:
        server = Lines([churn, "server", "127.0.0.1", str(p_churn)], stdin=True)
        started.append(server)
        wait_for(lambda: any('"ready"' in x for x in server.lines), 10, "churn server ready")
        nginx = start_nginx(tmp, p_http)
        started.append(nginx)
        # churn's client stops itself after 10 minutes: a chain of clients, each
        # waiting for "go" (their pids are known to the tracers from the start).
        seg_lens = [min(SEGMENT_S, duration - k * SEGMENT_S) for k in range(math.ceil(duration / SEGMENT_S))]
        clients = [Lines([churn, "client", "127.0.0.1", str(p_churn), str(int(churn_rate * seg)), "32",
                          str(churn_rate)], stdin=True, env={"CHURN_WAIT": "1"},
                         stderr_path=tmp / f"client{k}.err") for k, seg in enumerate(seg_lens)]
        started += clients
        chain = ChurnChain(clients)
        pids = [server.p.pid, *(c.p.pid for c in clients), nginx.pid, *children(nginx.pid)]
        pid_args = [a for p in pids for a in ("--pid", str(p))]
        oracle = Oracle((p_churn, p_http))
        started.append(oracle)
        watch = Lines([*tracer_cmd(), "watch", "--json", "--interval", "1", "--top", "3", *pid_args],
                      stderr_path=tmp / "watch.err")
        started.append(watch)
        export = Lines([*tracer_cmd(), "export", "--listen", f"127.0.0.1:{p_exp}", *pid_args],
                       stderr_path=tmp / "export.err")
        started.append(export)
        wait_for(lambda: "attached" in watch.stderr() and "serving " in export.stderr(), 120, "tracers attached")
        wait_for(lambda: len(watch.json_lines()) >= 2, 30, "watch reports")
        baseline_entries = watch.json_lines()[-1]["tracer"]["map_entries"]
        url = f"http://127.0.0.1:{p_exp}/metrics"
        baseline_scrape = urllib.request.urlopen(url, timeout=10).read().decode()
        baseline_exp_entries = metric_value(baseline_scrape, "pytracer_map_entries", 'map="socks"')

        samples: dict[str, list] = {k: [] for k in (
            "scrape_s", "scrape_errors", "rss_watch", "rss_export", "anon_watch", "anon_export", "fd_watch",
            "fd_export")}
        halt = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            i = 0
            while not halt.is_set():
                t = time.monotonic() - t0
                a = time.perf_counter()
                try:
                    urllib.request.urlopen(url, timeout=10).read()
                    samples["scrape_s"].append((t, time.perf_counter() - a))
                except OSError as exc:
                    samples["scrape_errors"].append((t, str(exc)))
                for name, proc in (("watch", watch), ("export", export)):
                    samples[f"rss_{name}"].append((t, rss_kib(proc.p.pid)))
                    samples[f"anon_{name}"].append((t, rss_kib(proc.p.pid, "RssAnon")))
                    samples[f"fd_{name}"].append((t, fd_count(proc.p.pid)))
                i += 1
                halt.wait(max(0.0, i - (time.monotonic() - t0)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ab = AbLoop(f"http://127.0.0.1:{p_http}/", ab_rate)
        chain.start()
        ab.start()
        log(f"soak: {minutes} min, churn {churn_rate}/s + ab {ab_rate}/s, tracers pids {watch.p.pid} "
            f"(watch) {export.p.pid} (export)")
        next_log = 60.0
        while time.monotonic() - t0 < duration:
            time.sleep(1)
            el = time.monotonic() - t0
            if el >= next_log:
                rep = watch.json_lines()[-1]
                log(f"soak: {el / 60:.0f} min: opened {rep['opened_total']} closed {rep['closed_total']} "
                    f"entries {rep['tracer']['map_entries']} ab {ab.complete} rss watch "
                    f"{samples['rss_watch'][-1][1]} KiB export {samples['rss_export'][-1][1]} KiB "
                    f"load {os.getloadavg()[0]:.2f}")
                result.setdefault("loadavg_per_minute", []).append(round(os.getloadavg()[0], 2))
                next_log += 60
        ab.halt.set()
        ab.join(timeout=120)
        chain.join(timeout=max(60, duration * 0.2))
        load_end = time.monotonic() - t0
        # Let the last connections close (the server's FIN, the client's last ACK; a
        # lost segment waits a retransmission), as ss sees them, then read the table
        # while the listeners still exist (as at the baseline).
        time.sleep(1)
        try:
            wait_for(lambda: none_open((p_churn, p_http)), 30, "every load connection closed (ss)")
        except TimeoutError:
            pass  # judged below: the oracle's count and the table say what stayed open
        leftover = open_on((p_churn, p_http))
        time.sleep(2)  # a watch report and a table read after the last close
        after_entries = watch.json_lines()[-1]["tracer"]["map_entries"]
        after_exp_entries = metric_value(urllib.request.urlopen(url, timeout=10).read().decode(),
                                         "pytracer_map_entries", 'map="socks"')
        server.p.stdin.close()  # type: ignore[union-attr]
        server.p.wait(timeout=30)
        server.reader.join(timeout=10)
        time.sleep(3)  # two more watch reports and a scrape after the load
        halt.set()
        sampler.join(timeout=15)
        last = watch.json_lines()[-1]
        final_scrape = urllib.request.urlopen(url, timeout=10).read().decode()
        oracle_counts = oracle.stop()
        for proc in (watch, export):
            proc.stop()
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=30)

        if chain.errors or len(chain.results) != len(clients):
            raise RuntimeError(f"churn clients failed: {chain.errors}")
        cl = {k: sum(r[k] for r in chain.results) for k in ("started", "completed", "errors")}
        cl["segments"] = len(chain.results)
        sv = [json.loads(x) for x in server.lines if '"accepted"' in x][-1]
        o = oracle_counts
        oracle_opened = (o.get(f"open:{p_churn}:active", 0) + o.get(f"open:{p_churn}:passive", 0)
                         + o.get(f"open:{p_http}:passive", 0))
        oracle_closed = (o.get(f"close:{p_churn}:active", 0) + o.get(f"close:{p_churn}:passive", 0)
                         + o.get(f"close:{p_http}:passive", 0))
        exp_opened = sum(metric_value(final_scrape, "pytracer_connections_opened_total", f'direction="{d}"')
                         for d in ("active", "passive"))
        exp_closed = sum(metric_value(final_scrape, "pytracer_connections_closed_total", f'direction="{d}"')
                         for d in ("active", "passive"))
        gen_opened = cl["completed"] + cl["errors"] + sv["accepted"] + ab.complete
        scrape_all = [s for _, s in samples["scrape_s"]]
        after = 120.0 if duration > 150 else duration * 2 / 3
        result.update({
            "ports": {"churn": p_churn, "http": p_http},
            "load_seconds": round(load_end, 1),
            "connections": cl["completed"] + ab.complete,
            "generator": {"churn_client": cl, "churn_server": sv, "ab_complete": ab.complete,
                          "ab_failed": ab.failed, "ab_batches": ab.batches, "ab_errors": ab.errors[:3],
                          "opened_expected": gen_opened},
            "oracle": {"counts": o, "opened": oracle_opened, "closed": oracle_closed, "unclosed": oracle.unclosed},
            "watch": {"opened_total": last["opened_total"], "closed_total": last["closed_total"],
                      "reports": len(watch.json_lines()), "insert_failed": last["tracer"]["insert_failed"]},
            "export": {"opened_total": exp_opened, "closed_total": exp_closed},
            "table": {"baseline": baseline_entries, "after": after_entries,
                      "export_baseline": baseline_exp_entries, "export_after": after_exp_entries,
                      "open_at_read": leftover[:10],
                      "peak": max(r["tracer"]["map_entries"] for r in watch.json_lines())},
            "scrape": {"count": len(scrape_all), "errors": len(samples["scrape_errors"]),
                       "p50_ms": round(1000 * percentile(scrape_all, 0.5), 1),
                       "p99_ms": round(1000 * percentile(scrape_all, 0.99), 1),
                       "max_ms": round(1000 * max(scrape_all, default=0), 1),
                       "per_minute_p99_ms": [round(1000 * percentile([s for t, s in samples["scrape_s"]
                                                                      if m * 60 <= t < (m + 1) * 60], 0.99), 1)
                                             for m in range(int(load_end // 60) + 1)]},
            "flat_from_s": after,
            "rss_kib": {n: flat(samples[f"rss_{n}"], after) for n in ("watch", "export")},
            "rss_anon_kib": {n: flat(samples[f"anon_{n}"], after) for n in ("watch", "export")},
            "rss_kib_per_minute": {n: [[min(v for t, v in samples[f"rss_{n}"] if m * 60 <= t < (m + 1) * 60),
                                        max(v for t, v in samples[f"rss_{n}"] if m * 60 <= t < (m + 1) * 60)]
                                       for m in range(int(load_end // 60))] for n in ("watch", "export")},
            # A scrape's connection and a leak scan's sock_diag socket, iterator and /proc
            # directories are open while they run: a sample may catch a few.
            "fds": {n: flat(samples[f"fd_{n}"], after, transient=FD_TRANSIENT) for n in ("watch", "export")},
            "load_after": os.getloadavg(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return result
    finally:
        for proc in started:
            popen = getattr(proc, "p", proc)
            if popen.poll() is None:
                popen.kill()
                popen.wait(timeout=30)
        if out is not None:
            out.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)


# The open issue in conftest.py (STALE_PER_BURST): now and then a socket's
# last events reach no program on the host, ours or bpftrace's, with no miss
# counted (seen here: one connection, both sides, in 252,200 sockets).  The
# oracle's closes may then fall short of its opens by that much; the ground
# truth for "closed" is the kernel's socket table (ss), and pytracer must
# still agree with the oracle exactly.
UNREPORTED_ENDS_PER_100K = 2


def unreported_ends_allowed(opened: int) -> int:
    return UNREPORTED_ENDS_PER_100K * max(1, math.ceil(opened / 100_000))


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    """What the soak shows, one boolean each."""
    unreported = r["oracle"]["opened"] - r["oracle"]["closed"]
    return {
        "opened exact vs oracle (watch, export)":
            r["watch"]["opened_total"] == r["oracle"]["opened"] == r["export"]["opened_total"],
        "opened exact vs load generators": r["oracle"]["opened"] == r["generator"]["opened_expected"],
        "closed exact vs oracle (watch, export)":
            r["watch"]["closed_total"] == r["oracle"]["closed"] == r["export"]["closed_total"],
        "every connection closed (ss)": not r["table"]["open_at_read"],
        "ends the kernel never reported, within the allowance":
            0 <= unreported <= unreported_ends_allowed(r["oracle"]["opened"]),
        "socket table back to baseline": (r["table"]["after"] == r["table"]["baseline"]
                                          and r["table"]["export_after"] == r["table"]["export_baseline"]),
        "RSS flat (+-5%)": all(v["ok"] for v in r["rss_kib"].values()),
        "open fds flat (+-5%)": all(v["ok"] for v in r["fds"].values()),
        "scrape p99 < 100 ms, every minute": (max(r["scrape"]["per_minute_p99_ms"]) < 100
                                              and r["scrape"]["errors"] == 0),
        "nothing failed to insert": r["watch"]["insert_failed"] == 0,
        # Both loads ran: ab's batches (one a second) completed, none failed to start.
        "ab load ran": (r["generator"]["ab_complete"] >= r["ab_rate"] * r["load_seconds"] // 2
                        and not r["generator"]["ab_errors"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=21)
    ap.add_argument("--churn-rate", type=int, default=1300, help="epoll client connections per second")
    ap.add_argument("--ab-rate", type=int, default=400, help="ab requests (connections) per second")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    a = ap.parse_args()
    r = soak(a.minutes, a.churn_rate, a.ab_rate, a.out)
    print(json.dumps(r, indent=2))
    v = verdicts(r)
    for k, ok in v.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    return 0 if all(v.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
