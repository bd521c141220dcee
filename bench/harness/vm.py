#!/usr/bin/env python3
"""VM benchmarks, host side: boot each test kernel and run bench/guest/guest_bench.py in it.

    python3 bench/harness/vm.py [--kernels 6.1,6.12] [--runs N] [--accel tcg|kvm] [--out DIR]
    python3 bench/harness/run.py vm        (the same, from the harness)

For each kernel, ``vagrant/host/run-vm`` boots the stock Debian kernel (TCG unless
``--accel kvm``), the guest runs bench/guest/guest_bench.py from the shared tree and
writes its JSON to the run directory's control share; this script copies it
into DIR/vm.json under ``kernels.KERNEL`` (results.json is not touched, so
other sections' numbers never conflict with these).  A kernel whose run
fails keeps what its guest wrote before the failure, with the exit code.

Time under TCG on a loaded 2-core host: boot and cost ~5 min, then ~8 min per
churn round (tcplife and tcpstates each compile for 2-4 min at every start),
so 5 rounds need ~50 min per kernel (the default timeout, 3600 s, allows it).

The guest has no compiler: churn is built static here (bench/build/churn-static)
and the CO-RE object must exist (``make bpf``).  Emulated absolute times mean
little: bench/harness/report.py shows ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import BUILD, GUEST, HERE, REPO, RESULTS  # noqa: E402

sys.path.insert(0, str(GUEST))  # guest_bench: the summaries are recomputed here
RUN_VM = REPO / "vagrant" / "host" / "run-vm"
KERNELS = ("5.10", "6.1", "6.12")


class VmBenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench-vm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_static_churn() -> Path:
    out = BUILD / "churn-static"
    src = HERE / "churn.c"
    out.parent.mkdir(exist_ok=True)
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-static", "-o", str(out), str(src)], check=True)
    return out


def summarize(data: dict[str, Any]) -> None:
    """(Re)compute the summaries from the raw runs and rounds, so a guest run
    cut short (deadline, signal) still reports what it measured, with its n."""
    from guest_bench import CONDITIONS, MODES, stats  # noqa: PLC0415 - bench/guest is on sys.path

    sec = data.get("sections", {})
    cost = sec.get("cost")
    if cost:
        runs = cost.get("runs", [])
        cost["summary"] = {
            m: {k: stats([r["modes"][m][k] for r in runs if m in r["modes"]])
                for k in ("ns_per_conn", "ratio_to_tp_btf")}
            for m in MODES if any(m in r["modes"] for r in runs)
        }
    churn = sec.get("churn")
    if churn:
        rs = churn.get("rounds", [])
        conds = [c for c in CONDITIONS if any(c in x["conds"] for x in rs)]
        churn["summary"] = {
            c: {k: stats([x["conds"][c][k] for x in rs if c in x["conds"]])
                for k in ("rps", "ratio_to_off", "cpu_pct")}
            for c in conds
        }
        sec["startup"] = {
            "exec_to_ready_s": {c: stats([x["conds"][c]["ready_s"] for x in rs if c in x["conds"]])
                                for c in conds if c != "off"},
            "ready_means": {"watch": "the 'attached' line on stderr", "export": "first /metrics answered",
                            "tcplife": "its header line on stdout", "tcpstates": "its header line on stdout"},
        }


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_kernel(kernel: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = REPO / "vagrant" / ".run" / f"bench-{kernel}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "vm-bench.json"
    result.unlink(missing_ok=True)
    guest = ["python3", str((GUEST / "guest_bench.py").relative_to(REPO)), "--out", "/run/pytracer-ctl/vm-bench.json",
             "--runs", str(args.runs), "--cost-runs", str(args.cost_runs), "--conns", str(args.conns),
             "--churn-conns", str(args.churn_conns),
             "--sections", args.sections]
    argv = [str(RUN_VM), "-t", str(args.timeout), "--accel", args.accel, "--smp", str(args.smp), kernel, "--",
            *guest]
    log(f"{kernel}: {' '.join(argv[1:])}")
    load0, t0 = loadavg(), time.monotonic()
    # The console is long: keep it in the run dir, pass on the bench's own lines.
    with open(run_dir / "host.log", "w") as hl:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTRACER_VM_RUNDIR": str(run_dir)})
        try:
            assert p.stdout is not None
            for line in p.stdout:
                hl.write(line)
                if "guest-bench" in line or line.startswith(("run-vm", "build-image")):
                    print(f"  {kernel}| {line.rstrip()}", flush=True)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.terminate()  # run-vm's trap stops qemu
                p.wait(timeout=30)
    wall = time.monotonic() - t0
    if not result.exists():
        raise VmBenchError(f"{kernel}: the guest wrote no result (run-vm exit {rc}); see {run_dir}/host.log")
    data = json.loads(result.read_text())
    summarize(data)
    data["host"] = {"rc": rc, "wall_s": round(wall, 1), "accel": args.accel, "smp": args.smp,
                    "loadavg_before": load0, "loadavg_after": loadavg(),
                    "command": f"vagrant/host/run-vm --accel {args.accel} --smp {args.smp} {kernel} -- "
                               f"{' '.join(guest)}"}
    log(f"{kernel}: run-vm exit {rc} after {wall:.0f}s")
    return data


def run(out_dir: Path, kernels: list[str], runs: int = 5, accel: str = "tcg", timeout: int = 3600,
        conns: int = 5000, churn_conns: int = 4000, sections: str = "cost,churn", smp: int = 2,
        cost_runs: int = 0) -> int:
    """Run the VM benchmarks; merge into out_dir/vm.json; 0 when every kernel succeeded."""
    args = argparse.Namespace(runs=runs, cost_runs=cost_runs or 2 * runs, accel=accel, timeout=timeout, conns=conns,
                              churn_conns=churn_conns,
                              sections=sections, smp=smp)
    if not (REPO / "pytracer" / "bpf" / "pytracer.bpf.o").exists():
        raise VmBenchError("pytracer/bpf/pytracer.bpf.o missing: run `make bpf` first (the guest has no clang)")
    build_static_churn()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "vm.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("kernels", {})
    doc["host"] = {"cpus": os.cpu_count(), "note": "shared host: other engineers' builds and VMs ran at the same time"}
    doc["command"] = (f"python3 bench/harness/vm.py --kernels {','.join(kernels)} --runs {runs} "
                      f"--cost-runs {args.cost_runs} --accel {accel}")
    failed = 0
    for k in kernels:
        try:
            data = run_kernel(k, args)
        except (VmBenchError, subprocess.SubprocessError, OSError, ValueError) as exc:
            print(f"bench-vm: error: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        failed += data["host"]["rc"] != 0
        doc["kernels"][k] = data
        path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated (default: all three)")
    ap.add_argument("--runs", type=int, default=5, help="cost runs and churn rounds per kernel (default 5)")
    ap.add_argument("--accel", choices=("tcg", "kvm"), default=os.environ.get("PYTRACER_VM_ACCEL", "tcg"))
    ap.add_argument("--timeout", type=int, default=3600,
                    help="seconds per kernel (run-vm -t); the guest starts no churn round it cannot finish")
    ap.add_argument("--smp", type=int, default=2, help="guest CPUs (default 2)")
    ap.add_argument("--cost-runs", type=int, default=0, help="cost runs per kernel (default: 2 x --runs)")
    ap.add_argument("--conns", type=int, default=5000, help="connections per cost run")
    ap.add_argument("--churn-conns", type=int, default=4000, help="connections per churn condition")
    ap.add_argument("--sections", default="cost,churn", help="guest sections: cost,churn")
    ap.add_argument("--out", default=str(RESULTS), help="directory for vm.json")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench-vm: run as root (qemu, image builds)", file=sys.stderr)
        return 1
    try:
        return run(Path(a.out), a.kernels.split(","), a.runs, a.accel, a.timeout, a.conns, a.churn_conns,
                   a.sections, a.smp, a.cost_runs)
    except (VmBenchError, subprocess.CalledProcessError) as exc:
        print(f"bench-vm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
