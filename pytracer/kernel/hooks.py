"""The hook table: for each fact the tracer needs from the kernel, the
programs that can deliver it, best first, and which backend has each.

Syscall tracepoints are opt-in (``--syscall-hooks``).  Enabling any
``syscalls:*`` tracepoint sets the syscall-tracepoint work flag on every task
(kernel/tracepoint.c, syscall_regfunc()), so every syscall of every process
on the host takes the slow path, whether or not our program filters the
event out.  Without them, an accepted socket is attributed to its listener's
process at birth, its fd comes from the leak scan's fd table, and the
application's close is taken from the FIN that tcp_close() sends.

Both backends plan from this one table: the CO-RE loader
(:mod:`pytracer.kernel.core`) and the bcc backend (:mod:`pytracer.kernel.bcc`).
A program keeps its name in both C files (``bpf/pytracer.bpf.c`` and
``bpf/pytracer_bcc.c``), so a candidate names it once.  Pure data and pure
functions: no I/O.

    state      tp_btf/inet_sock_set_state > tracepoint > fentry > kprobe tcp_set_state
    accept     fexit/inet_csk_accept > kretprobe > sys_exit_accept{4,}
    close      fentry/tcp_close > kprobe > sys_enter_close
    (a record ends at the state hook's transition to CLOSE: no destroy hook)
    reset      tp_btf/tcp_receive_reset (CO-RE) | tracepoint (bcc)   optional
    accept_fd  sys_exit_accept{4,}, when accept is not already the syscall
    listen     fexit/kprobe inet_csk_listen_start, for tcp_set_state() hooks
    follow     tp_btf > tracepoint sched_process_fork + sched_process_exit   opt-in (tracer run)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from pytracer.kernel.environment import Features

ATTACH_MODES = ("auto", "tp_btf", "tracepoint", "fentry", "kprobe")
BACKENDS = ("core", "bcc")
CORE = frozenset({"core"})
BOTH = frozenset(BACKENDS)
BCC = frozenset({"bcc"})


class TracerError(RuntimeError):
    """Loading or attaching failed; the message is one line for the user."""


@dataclass(frozen=True)
class Probe:
    """One program and where it attaches.  ``how`` and ``target`` are what bcc
    attaches by; libbpf reads them from the program's SEC() name."""

    how: str  # tp_btf | tracepoint | fentry | fexit | kprobe | kretprobe
    target: str  # "category:event" for tracepoints, else a kernel function
    program: str  # the function name in both C files
    required: bool = True  # False: attached when its tracepoint exists


@dataclass(frozen=True)
class Candidate:
    kind: str  # tp_btf | tracepoint | fentry | kprobe | syscall
    probes: tuple[Probe, ...]
    backends: frozenset[str] = BOTH

    @property
    def programs(self) -> tuple[str, ...]:
        return tuple(p.program for p in self.probes)


def _one(kind: str, how: str, target: str, program: str, backends: frozenset[str] = BOTH) -> Candidate:
    return Candidate(kind, (Probe(how, target, program),), backends)


_ACCEPT_EXIT = Candidate("syscall", (
    Probe("tracepoint", "syscalls:sys_exit_accept4", "accept4_sys_exit"),
    Probe("tracepoint", "syscalls:sys_exit_accept", "accept_sys_exit", required=False),
))

HOOKS: dict[str, tuple[Candidate, ...]] = {
    "state": (
        _one("tp_btf", "tp_btf", "sock:inet_sock_set_state", "state_tp_btf", CORE),
        _one("tracepoint", "tracepoint", "sock:inet_sock_set_state", "state_tracepoint"),
        _one("fentry", "fentry", "tcp_set_state", "state_fentry", CORE),
        _one("kprobe", "kprobe", "tcp_set_state", "state_kprobe"),
    ),
    "accept": (
        _one("fentry", "fexit", "inet_csk_accept", "accept_fexit", CORE),
        _one("kprobe", "kretprobe", "inet_csk_accept", "accept_kretprobe"),
        _ACCEPT_EXIT,
    ),
    "close": (
        _one("fentry", "fentry", "tcp_close", "close_fentry", CORE),
        _one("kprobe", "kprobe", "tcp_close", "close_kprobe"),
        _one("syscall", "tracepoint", "syscalls:sys_enter_close", "close_sys_enter"),
    ),
    "reset": (
        _one("tp_btf", "tp_btf", "tcp:tcp_receive_reset", "reset_tp_btf", CORE),
        _one("tracepoint", "tracepoint", "tcp:tcp_receive_reset", "reset_tracepoint", BCC),
    ),
    # Only when "accept" is not the syscall: inet_csk_accept() runs before
    # the new socket has a file or an fd; accept(2)'s exit has both.
    "accept_fd": (_ACCEPT_EXIT,),
    # Only with the tcp_set_state() hooks, which never see CLOSE -> LISTEN.
    "listen": (
        _one("fentry", "fexit", "inet_csk_listen_start", "listen_fexit", CORE),
        Candidate("kprobe", (
            Probe("kprobe", "inet_csk_listen_start", "listen_kprobe"),
            Probe("kretprobe", "inet_csk_listen_start", "listen_kretprobe"),
        )),
    ),
}
OPTIONAL_HOOKS = {"reset", "accept_fd"}
# Opt-in hooks, planned only when a command asks (never for watch, leaks or
# export, which so pay nothing for them).  "follow": `tracer run` follows a
# process tree in the kernel's "owners" filter, a forked child joining it
# and a process whose last thread exits leaving it (bpf/pytracer.bpf.c).
# Scheduler tracepoints, not syscall ones.
OPT_IN_HOOKS: dict[str, tuple[Candidate, ...]] = {
    "follow": (
        Candidate("tp_btf", (Probe("tp_btf", "sched:sched_process_fork", "fork_tp_btf"),
                             Probe("tp_btf", "sched:sched_process_exit", "exit_tp_btf")), CORE),
        Candidate("tracepoint", (Probe("tracepoint", "sched:sched_process_fork", "fork_tracepoint"),
                                 Probe("tracepoint", "sched:sched_process_exit", "exit_tracepoint"))),
    ),
}
# Hooks whose every remaining candidate may be a syscall tracepoint, and
# what the tracer does without them.
WITHOUT_SYSCALL_HOOKS = {
    "accept": "accepted sockets belong to their listener's process; the leak scan's fd table names the fd",
    "close": "the application's close is its FIN (tcp_close(): ESTABLISHED -> FIN_WAIT1, CLOSE_WAIT -> LAST_ACK)",
    "accept_fd": "the leak scan's fd table names an accepted socket's fd",
}
SYSCALL_VETO = "a syscall tracepoint slows every syscall on the host: off unless --syscall-hooks"
# State-hook kinds that need the listen hook on top of the others.
LISTEN_NEEDED_BY = {"fentry", "kprobe"}

# What each hook's program is called in the kernel, for messages.
HOOK_TARGETS = {
    "state": "inet_sock_set_state / tcp_set_state",
    "accept": "inet_csk_accept / accept(2)",
    "close": "tcp_close / close(2)",
    "reset": "tcp_receive_reset",
    "accept_fd": "accept(2) exit, for the fd",
    "listen": "inet_csk_listen_start",
    "follow": "sched_process_fork / sched_process_exit",
}

# With a forced attach mode, the kind each hook uses (a backend without that
# kind for a hook leaves it out: bcc has no BTF programs, CO-RE no reset
# tracepoint).
FORCED = {
    "tp_btf": {"state": "tp_btf", "accept": "syscall", "close": "syscall", "reset": "tp_btf", "follow": "tp_btf"},
    "tracepoint": {"state": "tracepoint", "accept": "syscall", "close": "syscall", "reset": "tracepoint",
                   "follow": "tracepoint"},
    "fentry": {
        "state": "fentry", "accept": "fentry", "close": "fentry", "reset": "tp_btf",
        "accept_fd": "syscall", "listen": "fentry", "follow": "tp_btf",
    },
    "kprobe": {
        "state": "kprobe", "accept": "kprobe", "close": "kprobe", "reset": "tracepoint",
        "accept_fd": "syscall", "listen": "kprobe", "follow": "tracepoint",
    },
}
BTF_MODES = ("tp_btf", "fentry")

# Kinds whose programs the verifier calls "trace type" (kernel/bpf/verifier.c,
# is_tracing_prog_type(): kprobe, tracepoint, raw_tracepoint, perf_event).
# tp_btf, fentry and fexit programs are BPF_PROG_TYPE_TRACING, not among them.
TRACE_TYPE_KINDS = ("tracepoint", "kprobe", "syscall")
# Before 6.1 a hash map without preallocation kmalloc()s each element as it
# is inserted, which the verifier deems unsafe in trace-type programs (they
# can fire inside the allocator); 5.7 to 6.0 say so with WARN_ONCE ("trace
# type BPF program uses run-time allocation", 94dacdbd5d2d), which taints
# the kernel.  6.1 moved hash maps to bpf_mem_alloc and lifted the rule
# (96da3f7d489d, "bpf: Remove tracing program restriction on map types").
RUNTIME_ALLOC_SAFE_SINCE = (6, 1)


# Hooks whose programs never touch the socket table: the fork and exit
# programs of "follow" write the pid filter only.
TABLE_FREE_HOOKS = frozenset({"follow"})


def table_prealloc_reason(hook_kinds: Iterable[tuple[str, str | None]], version: tuple[int, int]) -> str | None:
    """Why the socket table must be preallocated for a plan's programs,
    given as (hook, kind) pairs, on a ``version`` kernel, or None when it
    may allocate as it fills."""
    present = {k for h, k in hook_kinds if h not in TABLE_FREE_HOOKS}
    trace = [k for k in TRACE_TYPE_KINDS if k in present]
    if not trace or version >= RUNTIME_ALLOC_SAFE_SINCE:
        return None
    return (f"{' and '.join(trace)} programs use it, and before Linux 6.1 a table that allocates as it "
            "fills is unsafe in them (5.7 to 6.0 warn once and taint the kernel)")


@dataclass
class Choice:
    """What a hook got: the kind and programs, and why (doctor prints it)."""

    hook: str
    kind: str | None = None
    programs: tuple[str, ...] = ()
    reason: str = ""
    rejected: list[tuple[str, str]] = field(default_factory=list)


def syscall_hooks_wanted(value: bool | None = None, mode: str = "auto") -> bool:
    """``value``, or $PYTRACER_SYSCALL_HOOKS ("1"/"yes"/"true") when None.  A
    forced attach mode is an explicit request for every kind its FORCED row
    names, syscall tracepoints included."""
    if mode in FORCED:
        return True
    if value is not None:
        return bool(value)
    return os.environ.get("PYTRACER_SYSCALL_HOOKS", "").strip().lower() in ("1", "yes", "true", "on")


def optional(hook: str, syscall_hooks: bool) -> bool:
    """May ``hook`` end up with no program?"""
    return hook in OPTIONAL_HOOKS or (not syscall_hooks and hook in WITHOUT_SYSCALL_HOOKS)


def settle(ch: Choice, syscall_hooks: bool) -> None:
    """After planning or attaching ``ch``: raise TracerError if a required hook
    got no program; give an optional one that got none its reason."""
    if ch.kind is not None:
        return
    why = rejected_text(ch)
    if not optional(ch.hook, syscall_hooks):
        raise TracerError(f"cannot hook {HOOK_TARGETS[ch.hook]} ({why or 'no candidate for this attach mode'})")
    if not ch.reason and ch.hook in WITHOUT_SYSCALL_HOOKS and any(r == SYSCALL_VETO for _, r in ch.rejected):
        ch.reason = f"off: {WITHOUT_SYSCALL_HOOKS[ch.hook]} ({why})"


def syscall_tax(choices: dict[str, Choice]) -> list[str]:
    """The programs attached to syscall tracepoints (each taxes every syscall)."""
    return [p for ch in choices.values() if ch.kind == "syscall" for p in ch.programs]


def check_attach_mode(mode: str, backend: str) -> None:
    """Raise TracerError with one line for an attach mode ``backend`` lacks."""
    if mode not in ATTACH_MODES:
        raise TracerError(f"unknown attach mode {mode!r}: use one of {', '.join(ATTACH_MODES)}")
    if backend == "bcc" and mode in BTF_MODES:
        raise TracerError(
            f"the bcc backend has no {mode} programs (they need BTF): "
            "use --attach auto, tracepoint or kprobe, or --backend core"
        )


def candidates(hook: str, backend: str, mode: str = "auto") -> tuple[Candidate, ...]:
    """The backend's candidates for ``hook``, best first, under attach ``mode``."""
    forced = FORCED.get(mode)
    return tuple(
        c for c in (HOOKS.get(hook) or OPT_IN_HOOKS[hook])
        if backend in c.backends and (forced is None or forced.get(hook) == c.kind)
    )


def not_needed(hook: str, choices: dict[str, Choice]) -> str | None:
    """Why ``hook`` need not be attached, given the kinds already chosen for
    the hooks before it (both backends plan in HOOKS order), or None."""
    if hook == "listen" and choices["state"].kind not in LISTEN_NEEDED_BY:
        return f"not needed: the {choices['state'].kind} state hook sees CLOSE -> LISTEN"
    if hook == "accept_fd" and choices["accept"].kind == "syscall":
        return "not needed: the accept hook is accept(2)'s exit"
    return None


def tracepoints() -> tuple[str, ...]:
    """Every tracepoint a candidate attaches to, as "category/event"."""
    seen: dict[str, None] = {}
    for cands in (*HOOKS.values(), *OPT_IN_HOOKS.values()):
        for c in cands:
            for p in c.probes:
                if p.how in ("tp_btf", "tracepoint"):
                    seen[p.target.replace(":", "/")] = None
    return tuple(seen)


def static_veto(c: Candidate, f: Features, syscall_hooks: bool = True) -> str | None:
    """Why a candidate cannot work here, from cheap probes, or None."""
    if c.kind == "syscall" and not syscall_hooks:
        return SYSCALL_VETO
    if c.kind in BTF_MODES and not f.btf:
        return "no kernel BTF (/sys/kernel/btf/vmlinux)"
    if c.kind in BTF_MODES and f.version < (5, 5):
        return f"needs kernel 5.5, running {f.release}"
    if c.kind == "kprobe" and not f.kprobes:
        return "kprobes unavailable (no kprobe PMU or kprobe_events; CONFIG_KPROBES off?)"
    for p in c.probes:
        if p.how not in ("tracepoint", "tp_btf") or not p.required:
            continue
        # tp_btf attaches by BTF; tracefs only tells whether the event exists.
        if not f.tracefs:
            if p.how != "tp_btf":
                return "tracefs unavailable"
        elif not f.tracepoint(*p.target.split(":")):
            return f"tracepoint {p.target.replace(':', '/')} does not exist on this kernel"
    return None


def rejected_text(ch: Choice) -> str:
    return "; ".join(f"{k}: {r}" for k, r in ch.rejected)
