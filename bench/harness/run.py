#!/usr/bin/env python3
"""pytracer benchmarks: the cost of watching, kernel cost, churn overhead, accuracy, scale, startup.

    python3 bench/harness/run.py [--smoke] [--runs N] [--out DIR] [--sizes 10k,100k,1M] [--rate R] [SECTION ...]

Sections: watching cost churn accuracy scale startup (default: all), and vm (never by
default: bench/harness/vm.py, the test-VM figures, ~50 min per kernel under
emulation; it writes DIR/vm.json, not results.json).  Each writes its
raw numbers to DIR/results.json (merged with earlier sections' numbers);
``bench/harness/report.py`` turns that into BENCHMARKS.md tables and PNG plots.
``--smoke`` shrinks every size so the whole harness runs in well under two
minutes, and checks no targets: it only proves the harness works.
``--sizes`` (or ``BENCH_SCALE_SIZES``) picks the scale section's live-socket
counts; a size the host cannot hold (fs.file-max, MemAvailable) is skipped
with a logged reason, and rows of other sizes already in results.json stay.
``--rate`` is the watching section's fixed connection rate (bench/harness/watching.py:
CPU per connection under each observer, saturation ratios, the syscall tax, the
observer's own CPU); it runs with kernel.bpf_stats_enabled left as found, since
bpf_stats adds its own cost to every BPF program run.

All load is loopback on 127.0.0.x.  Every process started here is stopped by
pid on every exit path; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import (  # noqa: E402
    HERE,
    RESULTS,
    TRACER,
    VENV_PY,
    BenchError,
    Proc,
    bpf_ids,
    bpf_stats_enabled,
    build_churn,
    cpu_seconds,
    log,
    machine,
    map_memory,
    meminfo_kib,
    prog_stats,
    rss_kib,
    scale_limits,
    scale_refusal,
    start_bpftrace,
    start_nginx,
    start_tracer,
    stats,
    unwind_on_signals,
)

SECTIONS = ("watching", "cost", "churn", "accuracy", "scale", "startup")
# 1M takes ~4 minutes here (opening 500k connections ~10 s, five seeding passes ~15 s each, teardown);
# it is skipped with a logged reason where the host's limits or memory do not allow it.
DEFAULT_SCALE_SIZES = (10000, 100000, 1000000)


def parse_sizes(text: str) -> list[int]:
    """'10k,100k,1M' -> [10000, 100000, 1000000] (even, ascending)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        mult = {"k": 1000, "m": 1000000}.get(part[-1].lower(), 1)
        num = part[:-1] if mult > 1 else part
        if not num.isdigit() or int(num) * mult < 2:
            raise ValueError(f"bad size {part!r}: want a socket count such as 10000, 100k or 1M")
        out.append(int(num) * mult // 2 * 2)
    return sorted(set(out))


EXTRA_SECTIONS = ("vm",)  # only when named


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.runs = args.runs or (1 if self.smoke else 5)
        self.explicit_runs = args.runs
        self.rate = args.rate
        self.out = Path(args.out)
        self.scale_sizes: list[int] = getattr(args, "scale_sizes", None) or list(DEFAULT_SCALE_SIZES)
        self.out.mkdir(parents=True, exist_ok=True)
        self.churn = build_churn()
        self.port = 19100 + (os.getpid() % 400) * 2  # distinct per harness run
        path = self.out / "results.json"
        self.results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.results["machine"] = machine()
        self.results["smoke"] = self.smoke
        # `tracer export` is a later feature: measure it only where it exists.
        self.have_export = subprocess.run([TRACER, "export", "--help"], capture_output=True).returncode == 0

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, sort_keys=True))

    def next_port(self) -> int:
        self.port += 1
        return self.port

    # -- load generators ---------------------------------------------------

    def loop(self, n: int, port: int) -> float:
        """Sequential connect/accept/close n times; seconds."""
        out = subprocess.run([self.churn, "loop", "127.0.0.1", str(port), str(n)], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        return json.loads(out)["elapsed_s"]

    def server(self, port: int, addr: str = "127.0.0.1") -> Proc:
        s = Proc([self.churn, "server", addr, str(port)], name="churn-server")
        s.wait_for(lambda x: isinstance(x, dict) and x.get("ready"), 10)
        return s

    def client(self, port: int, n: int, conc: int = 64, rate: float = 0, wait: bool = False,
               addr: str = "127.0.0.1") -> Proc:
        return Proc([self.churn, "client", addr, str(port), str(n), str(conc), str(rate)],
                    env={"CHURN_WAIT": "1"} if wait else None, name="churn-client")

    def client_result(self, c: Proc, timeout: float = 300) -> dict[str, Any]:
        _, res = c.wait_for(lambda x: isinstance(x, dict) and x.get("role") == "client", timeout)
        c.wait(10)
        return res

    # -- 0. the cost of watching -------------------------------------------

    def watching(self) -> None:
        import watching  # noqa: PLC0415 - watching.py, beside this file

        self.results["watching"] = watching.Watching(self, self.rate, self.explicit_runs).run()
        self.save()

    # -- 1. kernel cost per event ------------------------------------------

    def cost(self) -> None:
        n = 2000 if self.smoke else 20000
        port = self.next_port()
        # auto: the default plan (what `tracer watch` attaches with no option);
        # a forced mode also attaches the syscall hooks its row names.
        modes = ["auto"] if self.smoke else ["auto", "tracepoint"]
        per_mode: dict[str, Any] = {}
        with bpf_stats_enabled():
            for mode in modes:
                log(f"cost: bpf_stats, attach {mode}, {self.runs} x {n} connect/accept/close")
                t = start_tracer(attach=None if mode == "auto" else mode)
                try:
                    ids = bpf_ids(t.pid)
                    runs: list[dict[str, Any]] = []
                    for _ in range(self.runs):
                        before = prog_stats(ids)
                        elapsed = self.loop(n, port)
                        after = prog_stats(ids)
                        run: dict[str, Any] = {"elapsed_s": elapsed, "progs": {}}
                        total_ns = 0
                        for pid_, a in after.items():
                            b = before.get(pid_, {"run_time_ns": 0, "run_cnt": 0})
                            dt, dc = a["run_time_ns"] - b["run_time_ns"], a["run_cnt"] - b["run_cnt"]
                            total_ns += dt
                            run["progs"][a["name"]] = {"ns_per_run": dt / dc if dc else None,
                                                      "runs_per_conn": dc / n, "ns_per_conn": dt / n}
                        run["bpf_ns_per_conn"] = total_ns / n
                        runs.append(run)
                finally:
                    t.stop()
                names = sorted({k for r in runs for k in r["progs"]})
                per_mode[mode] = {
                    "connections_per_run": n,
                    "progs": {
                        name: {
                            "ns_per_run": stats([r["progs"][name]["ns_per_run"] for r in runs if name in r["progs"]]),
                            "runs_per_conn": stats([r["progs"][name]["runs_per_conn"] for r in runs
                                                    if name in r["progs"]]),
                            "ns_per_conn": stats([r["progs"][name]["ns_per_conn"] for r in runs
                                                  if name in r["progs"]]),
                        }
                        for name in names
                    },
                    "bpf_ns_per_conn": stats([r["bpf_ns_per_conn"] for r in runs]),
                }
        # External clock: the same loop, tracer off vs on, alternating.
        log(f"cost: external clock, {self.runs} alternating off/on pairs of {n}")
        off, on, diffs = [], [], []
        for _ in range(self.runs):
            a = self.loop(n, port)
            t = start_tracer()
            try:
                b = self.loop(n, port)
            finally:
                t.stop()
            off.append(a / n * 1e9)
            on.append(b / n * 1e9)
            diffs.append((b - a) / n * 1e9)
        self.results["cost"] = {
            "modes": per_mode,
            "external": {"connections_per_run": n, "off_ns_per_conn": stats(off), "on_ns_per_conn": stats(on),
                         "delta_ns_per_conn": stats(diffs)},
            "command": f"python3 bench/harness/run.py cost  # churn loop 127.0.0.1 PORT {n}, "
                       "tracer watch (auto: the default plan) or tracer watch --attach MODE",
        }
        self.save()

    # -- 2. churn overhead -------------------------------------------------

    def _ab(self, port: int, n: int) -> float:
        out = subprocess.run(["ab", "-q", "-n", str(n), "-c", "32", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=300).stdout
        for line in out.splitlines():
            if line.startswith("Requests per second:"):
                return float(line.split()[3])
        raise BenchError("ab printed no requests/s: " + out[-300:])

    def _condition(self, cond: str, scrape_port: int) -> tuple[Proc | None, threading.Event | None, list[float]]:
        """Start a tracer condition; returns (process, stop-event for a scraper, scrape times)."""
        scrapes: list[float] = []
        if cond == "off":
            return None, None, scrapes
        if cond == "watch":
            return start_tracer(), None, scrapes
        if cond == "bpftrace":
            p = start_bpftrace(HERE / "tcplife.bt", out="text")
            return p, None, scrapes
        if cond == "export":
            p = start_tracer("export", "--listen", f"127.0.0.1:{scrape_port}")
            url = f"http://127.0.0.1:{scrape_port}/metrics"
            deadline = time.monotonic() + 120  # it seeds the host's sockets first
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or p.p.poll() is not None:
                        p.stop()
                        raise BenchError(f"tracer export did not serve {url}: {p.stderr[-300:]}") from None
                    time.sleep(0.1)
            stop = threading.Event()

            def scrape() -> None:
                while not stop.wait(1.0):
                    t0 = time.perf_counter()
                    try:
                        urllib.request.urlopen(url, timeout=5).read()
                        scrapes.append(time.perf_counter() - t0)
                    except OSError:
                        pass

            threading.Thread(target=scrape, daemon=True).start()
            return p, stop, scrapes
        raise ValueError(cond)

    def churn_overhead(self) -> None:
        conds = ["off", "watch", "export", "bpftrace"]
        if not self.have_export:
            conds.remove("export")
        n_epoll = 4000 if self.smoke else 40000
        n_ab = 2000 if self.smoke else 10000
        loads = ["epoll"] if self.smoke else ["epoll", "ab"]
        scrape_port = self.next_port()
        out: dict[str, Any] = {}
        tmp = tempfile.mkdtemp(prefix="pytracer-bench-")
        for load in loads:
            port = self.next_port()
            srv = self.server(port) if load == "epoll" else start_nginx(Path(tmp), port)
            rows: dict[str, list[dict[str, Any]]] = {c: [] for c in conds}
            try:
                log(f"churn: {load}, {self.runs} rounds of {', '.join(conds)}")
                for r in range(self.runs):
                    # Rotate the order each round so no condition always follows another.
                    order = conds[r % len(conds):] + conds[: r % len(conds)]
                    for cond in order:
                        p, stop, scrapes = self._condition(cond, scrape_port)
                        try:
                            cpu0 = cpu_seconds(p.pid) if p else 0.0
                            ids = bpf_ids(p.pid) if p else []
                            s0 = prog_stats(ids) if ids else {}
                            t0 = time.monotonic()
                            if load == "epoll":
                                res = self.client_result(self.client(port, n_epoll))
                                rps = res["completed"] / res["elapsed_s"]
                            else:
                                rps = self._ab(port, n_ab)
                            wall = time.monotonic() - t0
                            cpu = (cpu_seconds(p.pid) - cpu0) / wall * 100 if p else 0.0
                            s1 = prog_stats(ids) if ids else {}
                            bpf_ns = sum(v["run_time_ns"] - s0.get(k, {"run_time_ns": 0})["run_time_ns"]
                                         for k, v in s1.items())
                            rows[cond].append({"rps": rps, "cpu_pct": cpu, "bpf_cpu_pct": bpf_ns / 1e9 / wall * 100,
                                               "scrape_s": list(scrapes)})
                        finally:
                            if stop:
                                stop.set()
                            if p:
                                p.stop(signal.SIGINT)
            finally:
                srv.stop()
            base = stats([x["rps"] for x in rows["off"]])["median"] or 1
            out[load] = {
                cond: {
                    "rps": stats([x["rps"] for x in rows[cond]]),
                    "ratio": stats([x["rps"] / y["rps"] for x, y in zip(rows[cond], rows["off"])]),
                    "ratio_of_medians": (stats([x["rps"] for x in rows[cond]])["median"] or 0) / base,
                    "cpu_pct": stats([x["cpu_pct"] for x in rows[cond]]),
                    "bpf_cpu_pct": stats([x["bpf_cpu_pct"] for x in rows[cond]]),
                    "scrape_s": stats([s for x in rows[cond] for s in x["scrape_s"]]),
                }
                for cond in conds
            }
            self.results["churn"] = {**self.results.get("churn", {}), load: out[load]}
            self.save()
        # Tracer CPU at a fixed 10k connections/s (and the rate reached).
        rate = 2000 if self.smoke else 10000
        n = rate * (1 if self.smoke else 4)
        port = self.next_port()
        srv = self.server(port)
        fixed: dict[str, list[dict[str, float]]] = {"watch": []}
        if self.have_export and not self.smoke:
            fixed["export"] = []
        try:
            log(f"churn: tracer CPU at {rate} connections/s, {self.runs} runs")
            for _ in range(self.runs):
                for cond in fixed:
                    p, stop, _ = self._condition(cond, scrape_port)
                    assert p is not None
                    try:
                        ids = bpf_ids(p.pid)
                        s0 = prog_stats(ids)
                        cpu0, t0 = cpu_seconds(p.pid), time.monotonic()
                        res = self.client_result(self.client(port, n, conc=16, rate=rate))
                        wall = time.monotonic() - t0
                        cpu = (cpu_seconds(p.pid) - cpu0) / wall * 100
                        s1 = prog_stats(ids)
                        bpf_ns = sum(v["run_time_ns"] - s0.get(k, {"run_time_ns": 0})["run_time_ns"]
                                     for k, v in s1.items())
                        fixed[cond].append({"cpu_pct": cpu, "rate": res["completed"] / res["elapsed_s"],
                                            "bpf_cpu_pct": bpf_ns / 1e9 / wall * 100})
                    finally:
                        if stop:
                            stop.set()
                        p.stop(signal.SIGINT)
        finally:
            srv.stop()
        out["fixed_rate"] = {
            "target_rate": rate,
            **{c: {k: stats([x[k] for x in v]) for k in ("cpu_pct", "rate", "bpf_cpu_pct")} for c, v in fixed.items()},
        }
        out["command"] = (f"python3 bench/harness/run.py churn  # churn client 127.0.0.1 PORT {n_epoll} 64 0; "
                          f"ab -q -n {n_ab} -c 32 http://127.0.0.1:PORT/ (nginx, 1 worker)")
        self.results["churn"] = out
        self.save()

    # -- 3. accuracy at rate -------------------------------------------------

    def accuracy(self) -> None:
        n = 5000 if self.smoke else 100000
        runs: list[dict[str, Any]] = []
        log(f"accuracy: {self.runs} runs of {n} connections at full rate, vs client/server counts and bpftrace")
        for _ in range(self.runs):
            port = self.next_port()
            srv = self.server(port)
            cli = self.client(port, n, conc=64, wait=True)
            procs: list[Proc] = [srv, cli]
            try:
                oracle = start_bpftrace(HERE / "oracle.bt", str(port))
                procs.append(oracle)
                tr = start_tracer("--pid", str(srv.pid), "--pid", str(cli.pid), interval=0.5)
                procs.append(tr)
                cli.send()
                res = self.client_result(cli)
                time.sleep(1.5)  # let the last destroys land and a report go out
                srv.send("")
                srv.stop(signal.SIGTERM)
                _, sres = srv.wait_for(lambda x: isinstance(x, dict) and "accepted" in x, 10)
                tr.stop(signal.SIGINT)
                oracle.stop(signal.SIGINT)
                time.sleep(0.3)
                reports = tr.json_lines()
                last = reports[-1]
                o: dict[str, Any] = {}
                for item in oracle.json_lines():
                    for k, v in (item.get("data") or {}).items() if isinstance(item.get("data"), dict) else []:
                        o[k.lstrip("@")] = v
                life = last["lifetime"]["all"]
                runs.append({
                    "client_completed": res["completed"],
                    "client_errors": res["errors"],
                    "client_elapsed_s": res["elapsed_s"],
                    "server_accepted": sres["accepted"],
                    "tracer_opened": last["opened_total"],
                    "tracer_closed": last["closed_total"],
                    "tracer_lifetime_count": life["count"],
                    "tracer_lifetime_mean_us": life["sum_seconds"] / life["count"] * 1e6 if life["count"] else None,
                    "tracer_insert_failed": last["tracer"]["insert_failed"],
                    "tracer_counters": last["tracer"],
                    "tracer_tracked_at_end": last["tracked_sockets"],
                    "oracle_opened": o.get("opened_active", 0) + o.get("opened_passive", 0),
                    "oracle_closed": o.get("closed", 0),
                    "oracle_transitions": o.get("transitions", 0),
                    "oracle_lifetime_mean_us": (o.get("lifetime_us") or {}).get("average"),
                    "transitions_per_s": o.get("transitions", 0) / res["elapsed_s"],
                    "opened_per_s_series": [x["opened_per_second"] for x in reports],
                })
                r = runs[-1]
                log(f"  client {r['client_completed']} ok ({r['client_errors']} err), server {r['server_accepted']}, "
                    f"tracer opened {r['tracer_opened']} closed {r['tracer_closed']}, oracle opened "
                    f"{r['oracle_opened']} closed {r['oracle_closed']}, {r['transitions_per_s']:.0f} transitions/s")
            finally:
                for p in reversed(procs):
                    p.stop()
        expect = [2 * r["client_completed"] for r in runs]
        self.results["accuracy"] = {
            "connections_per_run": n,
            "runs": runs,
            "lost_opened": [e - r["tracer_opened"] for e, r in zip(expect, runs)],
            "lost_closed": [e - r["tracer_closed"] for e, r in zip(expect, runs)],
            "oracle_minus_tracer_opened": [r["oracle_opened"] - r["tracer_opened"] for r in runs],
            "oracle_minus_tracer_closed": [r["oracle_closed"] - r["tracer_closed"] for r in runs],
            "transitions_per_s": stats([r["transitions_per_s"] for r in runs]),
            "connections_per_s": stats([r["client_completed"] / r["client_elapsed_s"] for r in runs]),
            "command": f"python3 bench/harness/run.py accuracy  # churn client 127.0.0.1 PORT {n} 64 0 under "
                       "tracer watch --json --pid SERVER --pid CLIENT and bpftrace bench/harness/oracle.bt PORT",
        }
        self.save()

    # -- 4. scale ------------------------------------------------------------

    def scale(self) -> None:
        sizes = [2000] if self.smoke else self.scale_sizes
        lim = scale_limits()
        per_proc = lim["connections_per_holder"]
        log(f"scale: sizes {', '.join(f'{s:,}' for s in sizes)}; up to {per_proc:,} connections per holder "
            f"(RLIMIT_NOFILE {lim['nofile_hard']:,}, ephemeral ports {lim['port_range_size']:,})")
        # Rows are merged per size, so `--sizes 1000000` keeps the 10k and 100k rows of an earlier run.
        out: dict[str, Any] = {k: v for k, v in self.results.get("scale", {}).items() if k.isdigit()}
        for sockets in sizes:
            why = scale_refusal(sockets, lim)
            if why:
                log(f"scale: skipping {sockets:,} sockets: {why}")
                continue
            out[str(sockets)] = self._scale_one(sockets, per_proc)
            self.results["scale"] = {**out, "limits": lim, "command": self._scale_command(per_proc)}
            self.save()
        self.results["scale"] = {**out, "limits": lim, "command": self._scale_command(per_proc)}
        self.save()

    @staticmethod
    def _scale_command(per_proc: int) -> str:
        return (f"python3 bench/harness/run.py scale --sizes SIZES  # churn hold 127.0.x.y PORT <= {per_proc} "
                "per process; "
                "bench/harness/pollcycle.py times pytracer.snapshot + pytracer.build_report")

    def _scale_one(self, sockets: int, per_proc: int) -> dict[str, Any]:
        conns = sockets // 2
        # Deadlines grow with the size: at 1M a seeding pass is ~15 s and a scrape ~1 s here.
        slow = max(1.0, sockets / 100000)
        log(f"scale: {sockets:,} live sockets ({conns:,} connections), {self.runs} poll cycles and scrapes")
        procs: list[Proc] = []
        mem0 = meminfo_kib()
        try:
            cap = max(262144, int(sockets * 1.3))
            poll = Proc([VENV_PY, str(HERE / "pollcycle.py"), str(cap)], name="pollcycle")
            procs.append(poll)
            poll.wait_for(lambda x: isinstance(x, dict) and x.get("attached"), 30)
            watch = start_tracer("--max-sockets", str(cap), interval=1.0)
            procs.append(watch)
            sport = self.next_port()
            exp = start_tracer("export", "--listen", f"127.0.0.1:{sport}", "--max-sockets", str(cap))
            procs.append(exp)
            holders = []
            left, i = conns, 0
            t0 = time.monotonic()
            while left > 0:
                k = min(per_proc, left)
                i += 1
                h = Proc([self.churn, "hold", f"127.0.{10 + i // 250}.{1 + i % 250}", str(self.next_port()),
                          str(k)], name="churn-hold")
                procs.append(h)
                holders.append(h)
                left -= k
            for h in holders:
                h.wait_for(lambda x: isinstance(x, dict) and x.get("role") == "hold", 300 * slow)
            open_s = time.monotonic() - t0
            mem1 = meminfo_kib()
            log(f"  {conns:,} connections opened by {len(holders)} holders in {open_s:.1f}s")
            time.sleep(2.5)  # a couple of watch intervals at full size
            poll.send(f"{self.runs}\n")
            _, pres = poll.wait_for(lambda x: isinstance(x, dict) and "poll_s" in x, 300 * slow)
            scrapes, sizes_b = [], []
            url = f"http://127.0.0.1:{sport}/metrics"
            scrape_errors = []
            for _ in range(self.runs):
                t = time.perf_counter()
                try:
                    body = urllib.request.urlopen(url, timeout=60).read()
                except OSError as exc:
                    scrape_errors.append(str(exc))
                    continue
                scrapes.append(time.perf_counter() - t)
                sizes_b.append(len(body))
            wl = watch.json_lines()[-1]
            row = {
                "connections": conns,
                "holders": len(holders),
                "connections_per_holder": per_proc,
                "open_s": open_s,
                "kernel_kib_per_socket": {k: (mem1[k] - mem0[k]) / sockets for k in ("Slab", "SUnreclaim")}
                if mem0 and mem1 else None,
                "mem_available_drop_kib": mem0.get("MemAvailable", 0) - mem1.get("MemAvailable", 0),
                "poll_s": stats(pres["poll_s"]),
                "read_s": stats(pres["read_s"]),
                "map_entries": pres["map_entries"],
                "pollcycle_rss_kib": pres["rss_kib"],
                "seed_s": pres.get("seed_s"),
                "seed_runs_s": pres.get("seed_runs_s"),
                "seeded": pres.get("seeded"),
                "watch_rss_kib": rss_kib(watch.pid),
                "watch_read_seconds": wl["tracer"]["read_seconds"],
                "watch_map_entries": wl["tracer"]["map_entries"],
                "watch_insert_failed": wl["tracer"]["insert_failed"],
                "watch_leak_scan_seconds": (wl.get("leaks") or {}).get("scan_seconds"),
                "watch_reports": len(watch.json_lines()),
                "export_rss_kib": rss_kib(exp.pid),
                "scrape_s": stats(scrapes),
                "scrape_bytes": sizes_b[-1] if sizes_b else 0,
                "scrape_errors": scrape_errors,
                "map_bytes": map_memory(bpf_ids(watch.pid, "map")),
                "max_sockets": cap,
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            }
            log(f"  poll {row['poll_s']['median']:.3f}s scrape {row['scrape_s']['median'] or 0:.3f}s "
                f"seed {row['seed_s'] or 0:.2f}s watch RSS {row['watch_rss_kib']} map entries {pres['map_entries']}")
        finally:
            t1 = time.monotonic()
            # Signal every holder first: closing 1M sockets one holder at a time took 70 s.
            for p in procs:
                if p.name == "churn-hold" and p.p.poll() is None:
                    try:
                        os.kill(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for p in reversed(procs):
                p.stop(timeout=60)
            log(f"  stopped in {time.monotonic() - t1:.1f}s")
        row["close_s"] = time.monotonic() - t1
        return row

    # -- 5. startup -----------------------------------------------------------

    def startup(self) -> None:
        n = 1 if self.smoke else max(self.runs, 7)
        attached, first, first_default = [], [], []
        log(f"startup: {n} runs each of exec -> attached (strace) and exec -> first JSON line")
        for _ in range(n):
            with tempfile.NamedTemporaryFile("r", suffix=".strace") as tf:
                subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-ttt", "-e", "trace=execve,bpf",
                                "-o", tf.name, TRACER, "watch", "--json", "--duration", "0.05", "--interval", "0.05"],
                               capture_output=True, timeout=60, check=True)
                lines = Path(tf.name).read_text().splitlines()
            t_exec = next(float(ln.split()[1]) for ln in lines if "execve(" in ln)
            # The hooks' links; BPF_TRACE_ITER links are the fd-scan
            # iterators that seeding runs after the tracer is attached.
            att = [float(ln.split()[1]) for ln in lines
                   if ("BPF_RAW_TRACEPOINT_OPEN" in ln or "BPF_LINK_CREATE" in ln) and "BPF_TRACE_ITER" not in ln]
            if att:
                attached.append(max(att) - t_exec)
            t0 = time.monotonic()
            p = Proc([TRACER, "watch", "--json", "--interval", "0.05", "--top", "0"], name="tracer-watch")
            try:
                t1, _ = p.wait_for(lambda x: isinstance(x, dict), 120)
                first.append(t1 - t0)
            finally:
                p.stop(signal.SIGINT)
            if self.smoke:
                continue
            t0 = time.monotonic()
            p = Proc([TRACER, "watch", "--json"], name="tracer-watch")
            try:
                t1, _ = p.wait_for(lambda x: isinstance(x, dict), 120)
                first_default.append(t1 - t0)
            finally:
                p.stop(signal.SIGINT)
        self.results["startup"] = {
            "exec_to_attached_s": stats(attached),
            "exec_to_first_json_s": stats(first),
            "exec_to_first_json_default_interval_s": stats(first_default),
            "command": "strace -f --seccomp-bpf -ttt -e trace=execve,bpf tracer watch --json --duration 0.05 "
                       "--interval 0.05 (last BPF_LINK_CREATE/RAW_TRACEPOINT_OPEN of a hook - execve); "
                       "tracer watch --json --interval 0.05 (Popen -> first line)",
        }
        self.save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", metavar="SECTION", help=" ".join(SECTIONS) + " (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run: proves the harness works")
    ap.add_argument("--runs", type=int, default=0,
                    help="repetitions (default 5; watching: 6 rounds, 7 pairs; 1 with --smoke)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for results.json and plots")
    ap.add_argument("--sizes", default=os.environ.get("BENCH_SCALE_SIZES", ""),
                    help="live-socket counts for the scale section, e.g. 10k,100k,1M (default: $BENCH_SCALE_SIZES, "
                         f"else {','.join(map(str, DEFAULT_SCALE_SIZES))})")
    ap.add_argument("--rate", type=float, default=4000,
                    help="watching: fixed connection rate for CPU per connection (default 4000/s)")
    args = ap.parse_args()
    if args.rate <= 0:
        ap.error("--rate must be positive")
    unwind_on_signals()
    if os.geteuid() != 0:
        print("bench: run as root (the tracer needs it)", file=sys.stderr)
        return 1
    bad = [s for s in args.sections if s not in SECTIONS + EXTRA_SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]}: choose from {' '.join(SECTIONS + EXTRA_SECTIONS)}")
    try:
        sizes = parse_sizes(args.sizes) if args.sizes else list(DEFAULT_SCALE_SIZES)
    except ValueError as exc:
        ap.error(str(exc))
    args.scale_sizes = sizes
    if "vm" in args.sections:
        import vm  # noqa: PLC0415 - vm.py, beside this file: boots the test VMs

        try:
            rc = vm.run(Path(args.out), os.environ.get("BENCH_VM_KERNELS", "5.10 6.1 6.12").split(),
                        runs=args.runs or 5, accel=os.environ.get("PYTRACER_VM_ACCEL", "tcg"))
        except (vm.VmBenchError, subprocess.CalledProcessError) as exc:
            print(f"bench: vm: error: {exc}", file=sys.stderr)
            rc = 1
        args.sections = [s for s in args.sections if s != "vm"]
        if not args.sections:
            return rc
    b = Bench(args)
    t0 = time.monotonic()
    todo = args.sections or list(SECTIONS)
    table = {"cost": b.cost, "churn": b.churn_overhead, "accuracy": b.accuracy, "scale": b.scale,
             "startup": b.startup}
    # The cost of watching runs without turning bpf_stats on: it would add its own cost to every program.
    if "watching" in todo:
        if Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1":
            log("warning: kernel.bpf_stats_enabled=1 (left on by another tool): every BPF program run pays "
                "two clock reads, so every observer's cost reads high; `sysctl -w kernel.bpf_stats_enabled=0`")
        b.watching()
    # run_time_ns/run_cnt are only counted while bpf_stats is on (an fd held for these sections).
    with bpf_stats_enabled():
        for s in todo:
            if s != "watching":
                table[s]()
    log(f"done in {time.monotonic() - t0:.0f}s: {b.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
