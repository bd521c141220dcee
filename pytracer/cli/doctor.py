"""``tracer doctor``: what this kernel can do and which program each hook got."""

from __future__ import annotations

import json
import os

import click

from pytracer.cli.options import Context, make_tracer, run
from pytracer.kernel import environment as env
from pytracer.kernel import libbpf
from pytracer.kernel.core import TracerHandle
from pytracer.kernel.hooks import HOOK_TARGETS, TracerError, syscall_tax

CAPS = {
    "CAP_BPF": env.CAP_BPF,
    "CAP_PERFMON": env.CAP_PERFMON,
    "CAP_SYS_ADMIN": env.CAP_SYS_ADMIN,
    "CAP_NET_ADMIN": env.CAP_NET_ADMIN,
    "CAP_SYS_PTRACE": env.CAP_SYS_PTRACE,
    "CAP_DAC_READ_SEARCH": env.CAP_DAC_READ_SEARCH,
    "CAP_SYS_RESOURCE": env.CAP_SYS_RESOURCE,
}


def gather(obj: Context) -> dict:
    caps = env.effective_caps()
    out: dict = {
        "kernel": env.kernel_release(),
        "btf": os.path.exists(env.VMLINUX_BTF),
        "capabilities": {name: env.has_cap(caps, bit) for name, bit in CAPS.items()},
        "missing_capabilities": env.missing_capabilities(caps),
        "memlock": env.memlock_limit(),
    }
    out["mounts"] = env.ensure_mounts() if env.can_trace(caps) else {}
    f = env.probe_features()
    out["features"] = {
        "tracefs": f.tracefs,
        "kprobes": f.kprobes,
        "tp_btf": f.tp_btf,
        "socket_cookie_in_tracing": f.cookie_in_tracing,
        "bpf_stats_enabled": f.bpf_stats,
        "tracepoints": f.tracepoints,
    }
    try:
        lib = libbpf.library()
        out["libbpf"] = getattr(lib, "_name", "libbpf.so.1")
    except libbpf.LibbpfMissing as exc:
        out["libbpf"] = f"missing: {exc}"
    tracer = make_tracer(obj)
    out["backend"] = {"name": tracer.backend, "why": "BTF present" if out["btf"] else "no BTF"}
    if obj.backend != "auto":
        out["backend"]["why"] = f"--backend {obj.backend}"
    elif tracer.backend == "bcc":
        out["backend"]["why"] = getattr(tracer, "reason", "no BTF")
    try:
        with tracer:
            out["attach_mode"] = tracer.attach_mode
            out["key"] = "sk pointer" if tracer.key_by_ptr else "socket cookie"
            out["load_attempts"] = tracer.load_attempts
            out["hooks"] = {
                h: {
                    "target": HOOK_TARGETS[h],
                    "kind": c.kind,
                    "programs": list(c.programs),
                    "why": c.reason if c.kind or c.reason else "not available (optional)",
                    "rejected": [{"kind": k, "why": r} for k, r in c.rejected],
                }
                for h, c in tracer.choices.items()
            }
            out["socket_table"] = _socket_table(tracer)
            taxing = syscall_tax(tracer.choices)
            out["syscall_tax"] = {
                "programs": taxing,
                "why": ("syscall tracepoints attached: every syscall of every process on the host takes the "
                        "slow path while the tracer runs" if taxing else
                        "none: no syscall tracepoint is attached (--syscall-hooks would add them)"),
            }
            if tracer.backend == "bcc":
                out["backend"].update(
                    bcc=getattr(tracer, "bcc_version", None),
                    headers=getattr(tracer, "headers", None),
                    compile_seconds=round(getattr(tracer, "compile_seconds", None) or 0.0, 1),
                )
            out["status"] = "ok: loaded, attached and detached cleanly"
    except (TracerError, env.EnvironmentProblem, libbpf.LibbpfError) as exc:
        out["status"] = f"failed: {exc}"
    from pytracer.inventory import fdscan  # numpy: only once the tracer has been tried

    method, why = fdscan.method()
    fdscan.close_shared()
    out["fd_scan"] = {"method": method, "why": why}
    out["sock_destroy"] = _sock_destroy()
    out["running_tracers"], out["warnings"] = running()
    return out


def running() -> tuple[list[dict] | str, list[str]]:
    """The socket tables of the tracers running on this host, and a warning
    for each one that is full now (or a note for one that was earlier)."""
    from pytracer.table.health import running_tables

    try:
        tables = running_tables(exclude_pid=os.getpid())
    except (libbpf.LibbpfError, OSError) as exc:
        return f"not readable ({exc}): reading other tracers' tables needs CAP_SYS_ADMIN", []
    rows, warnings = [], []
    for t in tables:
        who = f"{t.comm} (pid {t.pid})"
        # One reading from outside: a table at capacity refuses every new socket.
        full = t.capacity > 0 and t.entries >= t.capacity
        if full:
            warnings.append(f"WARNING: {who}: socket table full ({t.entries:,}/{t.capacity:,} entries), "
                            f"{t.failed_total:,} socket(s) could not be tracked since it started: "
                            "its counts cover tracked sockets only: restart it with a larger --max-sockets")
        rows.append({"pid": t.pid, "command": t.comm, "entries": t.entries, "capacity": t.capacity,
                     "insert_failed": t.failed_total, "table_full": full})
    return rows, warnings


def _socket_table(tracer: TracerHandle) -> dict:
    """How the kernel holds the socket table: its size, and whether it was
    preallocated (and why)."""
    return {
        "entries": tracer.max_sockets,
        "nursery": tracer.nursery_slots,
        "preallocated": tracer.table_prealloc is not None,
        "kernel_memory_bytes": env.map_memlock(tracer.map("socks").fd),
        "why": (f"preallocated: {tracer.table_prealloc}" if tracer.table_prealloc else
                "allocated as sockets come (BPF_F_NO_PREALLOC)"),
    }


def _sock_destroy() -> dict:
    """Can `tracer destroy` end sockets here (CONFIG_INET_DIAG_DESTROY)?"""
    from pytracer.inventory.destroy import explain, probe

    try:
        err = probe()
    except OSError as exc:
        return {"available": False, "why": f"could not ask the kernel: {exc}"}
    except Exception as exc:  # doctor reports, never fails: e.g. a pyroute2 it does not know
        return {"available": False, "why": f"could not ask the kernel ({type(exc).__name__}: {exc})"}
    if err:
        return {"available": False, "why": explain(err)}
    return {"available": True, "why": "SOCK_DESTROY over sock_diag answered (CONFIG_INET_DIAG_DESTROY)"}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_obj
@run
def doctor(obj: Context, as_json: bool) -> None:
    """Check the kernel and privileges, load the programs, say which hook got which.

    \b
    Example:
      sudo tracer doctor
    """
    info = gather(obj)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        yes = {True: "yes", False: "no", None: "unknown"}
        click.echo(f"kernel        {info['kernel']}")
        click.echo(f"BTF           {yes[info['btf']]} ({env.VMLINUX_BTF})")
        click.echo("capabilities  " + " ".join(f"{k}={yes[v]}" for k, v in info["capabilities"].items()))
        for line in info["missing_capabilities"]:
            click.echo(f"              {line}")
        click.echo(f"memlock       {info['memlock']}")
        for path, what in info["mounts"].items():
            click.echo(f"mount         {path}: {what}")
        feats = info["features"]
        click.echo(
            f"features      tracefs={yes[feats['tracefs']]} kprobes={yes[feats['kprobes']]} "
            f"tp_btf={yes[feats['tp_btf']]} cookie-in-tracing={yes[feats['socket_cookie_in_tracing']]} "
            f"bpf_stats={yes[feats['bpf_stats_enabled']]}"
        )
        missing = [tp for tp, ok in feats["tracepoints"].items() if not ok]
        click.echo("tracepoints   " + ("all present" if not missing else "missing: " + ", ".join(missing)))
        click.echo(f"libbpf        {info['libbpf']}")
        click.echo(f"backend       {info['backend']['name']} ({info['backend']['why']})")
        if info["backend"].get("headers"):
            b = info["backend"]
            click.echo(f"bcc           {b['bcc']}, headers {b['headers']}, compiled in {b['compile_seconds']} s")
        if "hooks" in info:
            click.echo(f"attach mode   {info['attach_mode']}; records keyed by {info['key']}; "
                       f"{info['load_attempts']} load attempt(s)")
            click.echo("hooks:")
            for h, d in info["hooks"].items():
                progs = ",".join(d["programs"]) or "-"
                click.echo(f"  {h:<9} {d['target']:<38} -> {d['kind'] or '-':<10} {progs}")
                click.echo(f"  {'':<9} why: {d['why']}")
        if "socket_table" in info:
            t = info["socket_table"]
            mem = t["kernel_memory_bytes"]
            mem_text = f", {mem / 2**20:.1f} MiB of kernel memory now" if mem is not None else ""
            click.echo(f"socket table  {t['entries']:,} entries (+{t['nursery']:,} nursery){mem_text}; {t['why']}")
        if "syscall_tax" in info:
            tax = info["syscall_tax"]
            progs = f"yes, {','.join(tax['programs'])}: " if tax["programs"] else ""
            click.echo(f"syscall tax   {progs}{tax['why']}")
        fs = info["fd_scan"]
        click.echo("fd scan       " + ("BPF iterators: " if fs["method"] == "bpf" else "/proc walk: ") + fs["why"])
        sd = info["sock_destroy"]
        click.echo(f"sock destroy  {yes[sd['available']]}: {sd['why']}")
        tracers = info["running_tracers"]
        if isinstance(tracers, str) or not tracers:
            click.echo(f"tracers       {tracers or 'none running'}")
        for t in tracers if isinstance(tracers, list) else []:
            failed = f", {t['insert_failed']:,} could not be tracked since it started" if t["insert_failed"] else ""
            click.echo(f"tracer        pid {t['pid']} {t['command']}: socket table {t['entries']:,}/{t['capacity']:,}"
                       + failed)
        for w in info["warnings"]:
            click.echo(w)
        click.echo(f"status        {info['status']}")
    if not str(info["status"]).startswith("ok"):
        raise SystemExit(1)
