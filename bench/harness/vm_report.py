"""The VM section of BENCHMARKS.md, from bench/results/vm.json (bench/harness/vm.py).

Kept apart from report.py so the two files change independently.  Every
figure is a ratio within one VM run (emulated absolute times mean little):
median (min–max, n).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODES = ("tp_btf", "tracepoint", "fentry", "kprobe", "bcc")
CONDS = ("off", "watch", "export", "tcplife", "tcpstates")
COND_LABEL = {"off": "nothing attached", "watch": "`tracer watch`", "export": "`tracer export` (scraped 1/s)",
              "tcplife": "bcc `tcplife`", "tcpstates": "bcc `tcpstates`"}


def _mmm(s: dict[str, Any] | None, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    if not s or s.get("median") is None:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    return (f"{f.format(s['median'] * scale)}{unit} ({f.format(s['min'] * scale)}–{f.format(s['max'] * scale)}, "
            f"n={s['n']})")


def _state_prog(run_modes: dict[str, Any], mode: str) -> str | None:
    """The mode's state-change program: the one that runs most per connection."""
    progs = run_modes.get(mode, {}).get("progs", {})
    if not progs:
        return None
    return max(progs, key=lambda k: progs[k]["runs_per_conn"])


def _per_event_ratio(cost: dict[str, Any], mode: str) -> dict[str, Any]:
    """ns per run of the state-change program, as a ratio to tp_btf's, per run."""
    vals = []
    for r in cost.get("runs", []):
        base_p, p = _state_prog(r["modes"], "tp_btf"), _state_prog(r["modes"], mode)
        if base_p is None or p is None:
            continue
        b = r["modes"]["tp_btf"]["progs"][base_p]["ns_per_run"]
        v = r["modes"][mode]["progs"][p]["ns_per_run"]
        if b and v is not None:
            vals.append(v / b)
    if not vals:
        return {"median": None, "n": 0}
    vals.sort()
    n = len(vals)
    medv = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
    return {"median": medv, "min": vals[0], "max": vals[-1], "n": n}


def markdown(vm: dict[str, Any], plots: bool) -> list[str]:
    ks = sorted(vm.get("kernels", {}), key=lambda k: tuple(int(x) for x in k.split(".")))
    if not ks:
        return []
    kern = vm["kernels"]
    out = ["## 6. Test VMs: attach modes, bcc tools, start-up", "",
           f"`{vm.get('command', 'python3 bench/harness/vm.py')}` (host side; per kernel: "
           "`vagrant/host/run-vm KERNEL -- python3 bench/guest/guest_bench.py`). Stock Debian kernels under QEMU **"
           + "/".join(sorted({kern[k]['host']['accel'].upper() for k in ks})) + "** (software emulation) on a "
           "2-core host that other engineers were loading at the same time, so only **ratios within one VM run** "
           "mean anything; absolute emulated times are not shown except start-up, as a relative order.", ""]
    out += ["| kernel | release | VM wall | host load before → after | cost runs | churn rounds |",
            "|---|---|---|---|---|---|"]
    for k in ks:
        d = kern[k]
        h = d["host"]
        s = d.get("sections", {})
        out.append(f"| {k} | {d.get('kernel', '?')} | {h['wall_s']:.0f} s | {h['loadavg_before'][0]:.1f} → "
                   f"{h['loadavg_after'][0]:.1f} | {len(s.get('cost', {}).get('runs', []))} | "
                   f"{len(s.get('churn', {}).get('rounds', []))} |")
    # Runs from guest_bench.py since it calls the public API only keep bcc attached, first, throughout.
    bcc_fixed = any("bcc_position" in kern[k].get("sections", {}).get("cost", {}) for k in ks)
    order = ("the CO-RE modes attached in an order rotated each run, bcc attached once and first on every "
             "event throughout" if bcc_fixed else "attached in an order rotated each run")
    out += ["", "### BPF cost by attach mode, as a ratio to tp_btf in the same run", "",
            f"All modes loaded side by side (no pid filter), {order}; per run a "
            "200-connection warm-up, then a fixed-count sequential `churn loop` (connect, accept, close). "
            "bpf_stats `run_time_ns` summed over each mode's programs, per connection; and the state-change "
            "program's ns per run (per event). bpf_stats times the program body only: kprobe and fentry "
            "trampoline or int3 cost is not in it.", ""]
    out += ["| mode | " + " | ".join(f"{k}: per connection" for k in ks) + " | "
            + " | ".join(f"{k}: per state event" for k in ks) + " |",
            "|---|" + "---|" * (2 * len(ks))]
    for m in MODES:
        cells, cells_ev = [], []
        for k in ks:
            cost = kern[k].get("sections", {}).get("cost", {})
            summ = cost.get("summary", {}).get(m)
            if summ is None:
                why = cost.get("failed", {}).get(m)
                cells.append("did not load" if why else "n/a")
                cells_ev.append("")
                continue
            cells.append(_mmm(summ["ratio_to_tp_btf"]))
            cells_ev.append(_mmm(_per_event_ratio(cost, m)))
        out.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(cells_ev) + " |")
    out.append("")
    out += ["### Churn throughput: pytracer vs bcc tcplife and tcpstates, same VM", "",
            "epoll `churn server` and `churn client N 16 0` on loopback; one condition at a time, the order "
            "rotated each round. Ratio = connections/s over the same round's nothing-attached run; CPU = the "
            "tool's process utime+stime over the client's wall time, % of one core.", ""]
    out += ["| condition | " + " | ".join(f"{k}: throughput ratio | {k}: tool CPU %" for k in ks) + " |",
            "|---|" + "---|" * (2 * len(ks))]
    for c in CONDS:
        cells = []
        for k in ks:
            ch = kern[k].get("sections", {}).get("churn", {}).get("summary", {}).get(c)
            if ch is None:
                cells += ["n/a", "n/a"]
                continue
            cells += [_mmm(ch["ratio_to_off"], 3), "—" if c == "off" else _mmm(ch["cpu_pct"], 1)]
        out.append(f"| {COND_LABEL[c]} | " + " | ".join(cells) + " |")
    out.append("")
    out += ["### Start-up: exec → ready, same VM run", "",
            "From the churn rounds' own starts. Ready: `tracer watch` prints its `attached` line (stderr); "
            "`tracer export` answers its first /metrics; tcplife and tcpstates print their header (bcc compiles "
            "at every start). Emulated seconds: compare within a column.", ""]
    out += ["| tool | " + " | ".join(f"{k}: seconds | {k}: × `tracer watch`" for k in ks) + " |",
            "|---|" + "---|" * (2 * len(ks))]
    for c in CONDS[1:]:
        cells = []
        for k in ks:
            su = kern[k].get("sections", {}).get("startup", {}).get("exec_to_ready_s", {})
            s, w = su.get(c), su.get("watch")
            cells.append(_mmm(s, 1))
            ok = s and w and s.get("median") and w.get("median")
            cells.append(f"{s['median'] / w['median']:.1f}×" if ok else "n/a")
        out.append(f"| {COND_LABEL[c]} | " + " | ".join(cells) + " |")
    out.append("")
    errs = [f"{k}: {e}" for k in ks for e in kern[k].get("errors", [])]
    errs += [f"{k}: {m} did not load: {why}" for k in ks
             for m, why in kern[k].get("sections", {}).get("cost", {}).get("failed", {}).items()]
    if errs:
        out += ["Errors and modes that did not load:", ""] + [f"- {e}" for e in errs] + [""]
    if plots:
        out += ["![vm](bench/results/vm.png)", ""]
    return out


def plot(vm: dict[str, Any], outdir: Path) -> bool:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ks = sorted(vm.get("kernels", {}), key=lambda k: tuple(int(x) for x in k.split(".")))
    if not ks:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.8 / len(ks)
    for i, k in enumerate(ks):
        s = vm["kernels"][k].get("sections", {})
        summ = s.get("cost", {}).get("summary", {})
        xs = [j for j, m in enumerate(MODES) if m in summ]
        med = [summ[MODES[j]]["ratio_to_tp_btf"]["median"] for j in xs]
        lo = [m - summ[MODES[j]]["ratio_to_tp_btf"]["min"] for j, m in zip(xs, med)]
        hi = [summ[MODES[j]]["ratio_to_tp_btf"]["max"] - m for j, m in zip(xs, med)]
        a1.bar([x + i * w for x in xs], med, w, yerr=[lo, hi], capsize=2, label=k)
        ch = s.get("churn", {}).get("summary", {})
        xs2 = [j for j, c in enumerate(CONDS) if c in ch]
        med2 = [ch[CONDS[j]]["ratio_to_off"]["median"] for j in xs2]
        lo2 = [m - ch[CONDS[j]]["ratio_to_off"]["min"] for j, m in zip(xs2, med2)]
        hi2 = [ch[CONDS[j]]["ratio_to_off"]["max"] - m for j, m in zip(xs2, med2)]
        a2.bar([x + i * w for x in xs2], med2, w, yerr=[lo2, hi2], capsize=2, label=k)
    a1.set_xticks([j + 0.4 - w / 2 for j in range(len(MODES))], MODES, fontsize=8)
    a1.axhline(1, color="grey", lw=0.8)
    a1.set_ylabel("BPF ns per connection ÷ tp_btf")
    a1.set_title("attach modes (bpf_stats)", fontsize=9)
    a1.legend(fontsize=8)
    a2.set_xticks([j + 0.4 - w / 2 for j in range(len(CONDS))], CONDS, fontsize=8)
    a2.axhline(1, color="grey", lw=0.8)
    a2.set_ylabel("connections/s ÷ same round's off")
    a2.set_title("churn throughput", fontsize=9)
    a2.legend(fontsize=8)
    fig.suptitle("Test VMs (QEMU TCG, loaded 2-core host): ratios within one run", fontsize=10)
    fig.tight_layout()
    fig.savefig(outdir / "vm.png", dpi=110)
    plt.close(fig)
    return True
