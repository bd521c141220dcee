#!/usr/bin/env python3
"""The VM benchmarks' guest side: run inside a test VM by bench/harness/vm.py.

    vagrant/host/run-vm KERNEL -- python3 bench/guest/guest_bench.py --out /run/pytracer-ctl/vm-bench.json

Under emulation (QEMU TCG) absolute times mean little, so everything here is
measured so that it can be read as a ratio within the same run:

  cost     every attach mode loaded side by side (CO-RE tp_btf, tracepoint,
           fentry, kprobe, and the bcc backend), then a fixed-count sequential
           connect/accept/close loop (churn loop); bpf_stats
           run_time_ns/run_cnt per program and per connection.  The CO-RE
           modes attach in an order rotated each run (the first program on an
           event pays its cold caches).  bcc compiles for minutes under TCG,
           so it is compiled and attached once, before the first run, and
           stays first on every event: pytracer's public API has no way to
           detach and re-attach its probes (see bench/notes.md).
  churn    epoll churn throughput with nothing attached, `tracer watch`,
           `tracer export` (scraped every second), bcc tcplife and bcc
           tcpstates (Debian bpfcc-tools), conditions rotated each round;
           the tool's CPU (utime+stime) as % of one core.
  startup  taken from the churn rounds' own starts: exec -> the "attached"
           line for `tracer watch`, exec -> the header line for tcplife and
           tcpstates (bcc compiles at every start), exec -> first scrape for
           `tracer export`.

Results are written after every run and round, so a run cut short by the
deadline still leaves what it measured (with its n).  Every process started
here is stopped by pid on every exit path, and every wait has a deadline.
Runs with the guest's own python3 and the project tree on sys.path, and calls
pytracer's public API only (``import pytracer``) or its CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]  # bench/guest/ -> the project tree
sys.path.insert(0, str(REPO))

CORE_MODES = ("tp_btf", "tracepoint", "fentry", "kprobe")
MODES = (*CORE_MODES, "bcc")
CONDITIONS = ("off", "watch", "export", "tcplife", "tcpstates")
TOOLS = {"tcplife": "/usr/sbin/tcplife-bpfcc", "tcpstates": "/usr/sbin/tcpstates-bpfcc"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class GuestBenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[guest-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stats(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def rotate(items: tuple[str, ...] | list[str], r: int) -> list[str]:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc:
    """A child with stdout and stderr in files (no pipe can fill up and block it)."""

    def __init__(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"gb-{name}-")
        self.out_path = Path(self.dir, "out")
        self.err_path = Path(self.dir, "err")
        self.t0 = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
                                      env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self, which: str = "out") -> str:
        try:
            return (self.out_path if which == "out" else self.err_path).read_text(errors="replace")
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> float:
        """Seconds from exec until ready() holds; raises if the child exits or time runs out."""
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if ready():
                return time.monotonic() - self.t0
            if self.p.poll() is not None:
                raise GuestBenchError(f"{self.name} exited ({self.p.returncode}) before it was ready: "
                                      f"{self.text('err').strip()[-300:]}")
            time.sleep(0.02)
        raise GuestBenchError(f"{self.name}: not ready within {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=10)


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def bpf_stats_enabled():  # noqa: ANN201
    path = "/proc/sys/kernel/bpf_stats_enabled"
    old = Path(path).read_text().strip()
    Path(path).write_text("1")
    try:
        yield
    finally:
        Path(path).write_text(old)


class GuestBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.churn = args.churn
        self.out = Path(args.out)
        self.deadline = float(os.environ.get("PYTRACER_VM_DEADLINE") or time.time() + 3600) - 60
        self.port = 20100
        self.results: dict[str, Any] = {
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "sections": {},
            "errors": [],
        }

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        tmp.replace(self.out)

    def left_s(self) -> float:
        return self.deadline - time.time()

    def next_port(self) -> int:
        self.port += 1
        return self.port

    def loop(self, n: int, port: int) -> float:
        return run_json([self.churn, "loop", "127.0.0.1", str(port), str(n)], 600)["elapsed_s"]

    # -- cost per event, by attach mode ------------------------------------

    def cost(self) -> None:
        import pytracer  # noqa: PLC0415 - after sys.path

        n, runs = self.args.conns, self.args.cost_runs or self.args.runs
        port = self.next_port()
        sec: dict[str, Any] = {"connections_per_run": n, "runs": [], "failed": {}, "choices": {},
                               "bcc_position": "first on every event, every run (attached once)"}
        self.results["sections"]["cost"] = sec
        log("cost: compiling and attaching the bcc backend once (it stays attached, first, for every run)")
        with contextlib.ExitStack() as keep:
            bcc = None
            try:
                bcc = keep.enter_context(pytracer.BccTracer())
                sec["bcc_compile_s"] = bcc.compile_seconds
                sec["choices"]["bcc"] = {h: c.kind for h, c in bcc.choices.items()}
            except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
                sec["failed"]["bcc"] = str(exc)[:300]
                bcc = None
            core = [m for m in CORE_MODES if m not in sec["failed"]]
            for r in range(runs):
                if self.left_s() < 120:
                    log("cost: stopping early, the deadline is near")
                    break
                order = rotate(core, r)
                with contextlib.ExitStack() as stack:
                    loaded: dict[str, Any] = {"bcc": bcc} if bcc is not None else {}
                    for m in order:
                        try:
                            t = stack.enter_context(pytracer.Tracer(attach=m))
                        except (pytracer.TracerError, OSError) as exc:
                            sec["failed"][m] = str(exc)[:300]
                            core.remove(m)
                            continue
                        loaded[m] = t
                        sec["choices"].setdefault(m, {h: c.kind for h, c in t.choices.items()})
                    self.loop(200, port)  # warm the path (not measured)
                    before = {m: {p.name: p.info() for p in t.programs()} for m, t in loaded.items()}
                    before = {m: {k: (v.run_time_ns, v.run_cnt) for k, v in d.items()} for m, d in before.items()}
                    elapsed = self.loop(n, port)
                    run: dict[str, Any] = {"order": list(loaded), "elapsed_s": elapsed, "modes": {}}
                    for m, t in loaded.items():
                        progs = {}
                        total = 0
                        for p in t.programs():
                            i = p.info()
                            b_ns, b_cnt = before[m].get(p.name, (0, 0))
                            dt, dc = i.run_time_ns - b_ns, i.run_cnt - b_cnt
                            total += dt
                            progs[p.name] = {"ns_per_run": dt / dc if dc else None, "runs_per_conn": dc / n}
                        run["modes"][m] = {"ns_per_conn": total / n, "progs": progs}
                    base = run["modes"].get("tp_btf", {}).get("ns_per_conn")
                    for v in run["modes"].values():
                        v["ratio_to_tp_btf"] = v["ns_per_conn"] / base if base else None
                    sec["runs"].append(run)
                    log(f"cost run {r + 1}/{runs} order {','.join(run['order'])}: " + ", ".join(
                        f"{m} {v['ns_per_conn']:.0f} ns/conn" for m, v in run["modes"].items()))
                self.save()
        sec["summary"] = {
            m: {
                "ns_per_conn": stats([r["modes"][m]["ns_per_conn"] for r in sec["runs"] if m in r["modes"]]),
                "ratio_to_tp_btf": stats([r["modes"][m]["ratio_to_tp_btf"] for r in sec["runs"]
                                          if m in r["modes"]]),
            }
            for m in MODES if any(m in r["modes"] for r in sec["runs"])
        }
        self.save()

    # -- churn throughput and start-up, pytracer vs bcc tools ----------------

    def _start(self, cond: str, scrape_port: int) -> tuple[Proc | None, float | None, Callable[[], None]]:
        """Start a condition; returns (process, exec -> ready seconds, stop-the-extras)."""
        py = [sys.executable, "-m", "pytracer"]
        env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        if cond == "off":
            return None, None, lambda: None
        if cond == "watch":
            p = Proc([*py, "watch", "--json", "--interval", "1", "--top", "0"], "tracer-watch", env)
            try:
                ready = p.wait_until(lambda: "attached" in p.text("err"), 600)
            except BaseException:
                p.stop()
                raise
            return p, ready, lambda: None
        if cond == "export":
            p = Proc([*py, "export", "--listen", f"127.0.0.1:{scrape_port}"], "tracer-export", env)
            url = f"http://127.0.0.1:{scrape_port}/metrics"

            def served() -> bool:
                try:
                    urllib.request.urlopen(url, timeout=5).read()
                    return True
                except OSError:
                    return False

            try:
                ready = p.wait_until(served, 600)
            except BaseException:
                p.stop()
                raise
            stop = threading.Event()

            def scrape() -> None:
                while not stop.wait(1.0):
                    with contextlib.suppress(OSError):
                        urllib.request.urlopen(url, timeout=5).read()

            th = threading.Thread(target=scrape, daemon=True)
            th.start()

            def end() -> None:
                stop.set()
                th.join(10)

            return p, ready, end
        tool = TOOLS[cond]
        p = Proc([tool], cond, env)
        try:
            ready = p.wait_until(lambda: p.text().strip() != "", 900)  # its header: attached
        except BaseException:
            p.stop()
            raise
        return p, ready, lambda: None

    def churn_rounds(self) -> None:
        n, rounds = self.args.churn_conns, self.args.runs
        conds = [c for c in CONDITIONS if c not in ("tcplife", "tcpstates") or os.path.exists(TOOLS[c])]
        sec: dict[str, Any] = {"connections_per_run": n, "concurrency": 16, "conditions": conds,
                               "missing": [c for c in CONDITIONS if c not in conds], "rounds": []}
        self.results["sections"]["churn"] = sec
        scrape_port = self.next_port()
        port = self.next_port()
        server = Proc([self.churn, "server", "127.0.0.1", str(port)], "churn-server")
        try:
            server.wait_until(lambda: '"ready"' in server.text(), 30)
            round_s = 0.0
            for r in range(rounds):
                if self.left_s() < max(120.0, round_s * 1.05):
                    log(f"churn: stopping after {r} rounds, the deadline is near")
                    break
                t_round = time.monotonic()
                order = rotate(conds, r)
                rnd: dict[str, Any] = {"order": order, "conds": {}}
                for cond in order:
                    log(f"churn round {r + 1}: {cond}")
                    p, ready_s, end = self._start(cond, scrape_port)
                    try:
                        cpu0 = cpu_seconds(p.pid) if p else 0.0
                        t0 = time.monotonic()
                        res = run_json([self.churn, "client", "127.0.0.1", str(port), str(n), "16", "0"], 600)
                        wall = time.monotonic() - t0
                        cpu = (cpu_seconds(p.pid) - cpu0) / wall * 100 if p else 0.0
                    finally:
                        end()
                        if p:
                            p.stop()
                    rnd["conds"][cond] = {"rps": res["completed"] / res["elapsed_s"], "errors": res["errors"],
                                          "cpu_pct": cpu, "ready_s": ready_s}
                off = rnd["conds"]["off"]["rps"]
                for v in rnd["conds"].values():
                    v["ratio_to_off"] = v["rps"] / off if off else None
                sec["rounds"].append(rnd)
                round_s = time.monotonic() - t_round
                log(f"churn round {r + 1}/{rounds} ({round_s:.0f}s): " + ", ".join(
                    f"{c} {v['rps']:.0f}/s x{v['ratio_to_off']:.2f} cpu {v['cpu_pct']:.0f}%"
                    + (f" ready {v['ready_s']:.1f}s" if v["ready_s"] is not None else "")
                    for c, v in rnd["conds"].items()))
                self.save()
        finally:
            server.stop(signal.SIGTERM)
        rs = sec["rounds"]
        sec["summary"] = {
            c: {k: stats([x["conds"][c][k] for x in rs]) for k in ("rps", "ratio_to_off", "cpu_pct")}
            for c in conds
        }
        self.results["sections"]["startup"] = {
            "exec_to_ready_s": {c: stats([x["conds"][c]["ready_s"] for x in rs]) for c in conds if c != "off"},
            "ready_means": {"watch": "the 'attached' line on stderr", "export": "first /metrics answered",
                            "tcplife": "its header line on stdout", "tcpstates": "its header line on stdout"},
        }
        self.save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON result file (written after every run)")
    ap.add_argument("--runs", type=int, default=5, help="runs of cost, rounds of churn (default 5)")
    ap.add_argument("--cost-runs", type=int, default=0, help="cost runs (default: --runs); cheap, one bcc compile")
    ap.add_argument("--conns", type=int, default=5000, help="connections per cost run")
    ap.add_argument("--churn-conns", type=int, default=4000, help="connections per churn condition")
    ap.add_argument("--churn", default=str(REPO / "bench/build/churn-static"), help="static churn binary")
    ap.add_argument("--sections", default="cost,churn", help="comma-separated: cost,churn")
    args = ap.parse_args()

    def on_term(sig: int, _frame: Any) -> None:
        raise SystemExit(128 + sig)  # unwinds through every finally: children are stopped

    signal.signal(signal.SIGTERM, on_term)
    b = GuestBench(args)
    b.save()
    t0 = time.monotonic()
    rc = 0
    with bpf_stats_enabled():
        for s in args.sections.split(","):
            t1 = time.monotonic()
            try:
                {"cost": b.cost, "churn": b.churn_rounds}[s]()
            except Exception as exc:  # noqa: BLE001 - recorded, then the next section runs
                msg = f"{s}: {type(exc).__name__}: {exc}"
                print(f"guest-bench: error: {msg}", file=sys.stderr, flush=True)
                b.results["errors"].append(msg)
                rc = 1
            b.results.setdefault("section_s", {})[s] = round(time.monotonic() - t1, 1)
            b.save()
    b.results["wall_s"] = round(time.monotonic() - t0, 1)
    b.save()
    log(f"done in {b.results['wall_s']:.0f}s: {b.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
