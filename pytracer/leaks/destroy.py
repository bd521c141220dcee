"""``tracer destroy``, the library layer: choose stuck sockets, re-check each, end it.

The choice is the leak scan's: a socket is a candidate for ``--kind K``
exactly when ``tracer leaks`` flags it with kind K under the same
thresholds (:class:`pytracer.leaks.scanner.Scanner`, the detectors'
names and thresholds), so the two commands never disagree.  ``--state S``
instead takes every socket in TCP state S that a ``--pid`` holds or that
uses a ``--port``, from the same inventory and fd scan.

Safety rules, each enforced here and tested:

* listeners are never ended (not chosen, and refused again at the re-check);
* at most ``max_sockets`` per run (the oldest first);
* acting (``--yes``) needs a filter: ``--pid``, ``--port``, or a kind with
  its threshold given explicitly (:func:`refusal`);
* each socket is looked up again just before it is ended, by 4-tuple *and*
  cookie (a reused 4-tuple is another socket: left alone), and must still be
  in the state it was chosen in (and, for ``idle_established``, still idle);
  the end request carries the cookie too, so the kernel refuses a socket
  that changed in between (ESTALE).

The pure parts (:func:`select`, :func:`refusal`, :func:`recheck`) take data
and return data; :func:`choose` and :func:`end` do the I/O.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from pytracer.format import address, family_name
from pytracer.inventory import procs, sockdiag
from pytracer.inventory.destroy import Destroyer, DestroyError, explain, probe
from pytracer.inventory.owners import scan_fds, scope_mask
from pytracer.inventory.session import Session
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.detectors import Flag, kernel_state_floor, ordered
from pytracer.leaks.facts import listener_of, listeners
from pytracer.leaks.report import LeakReport
from pytracer.leaks.scanner import MAX_SOCKET_FACTS, Scanner
from pytracer.leaks.thresholds import Thresholds

# Socket kinds of the leak detectors -> the threshold that decides them.
KIND_THRESHOLDS = {
    "close_wait": "close_wait_after",
    "idle_established": "idle_after",
    "fin_wait2_orphan": "fin_wait2_after",
    "fin_wait2_stuck": "fin_wait2_after",
    "last_ack_stuck": "last_ack_after",
}
DESTROY_KINDS = tuple(KIND_THRESHOLDS)
# --state: any state a connection can be in (never LISTEN).
DESTROY_STATES = tuple(s.name for s in TcpState
                       if s not in (TcpState.LISTEN, TcpState.CLOSE, TcpState.BOUND_INACTIVE) and s.value)
MAX_DEFAULT = 100

# Outcomes of one socket.
ENDED, SKIPPED, FAILED = "ended", "skipped", "failed"


class DestroyRefused(Exception):
    """The run cannot act at all (no filter, kernel support, capability): one line for the user."""


@dataclass
class Plan:
    """What a run would end: ``targets`` (at most the cap, oldest first),
    out of ``matched`` sockets that fit the selection."""

    targets: list[Flag]
    matched: int
    listeners_left: int = 0  # chosen by the filters but listening: never ended


@dataclass
class Outcome:
    flag: Flag
    result: str  # ENDED, SKIPPED or FAILED
    reason: str = ""


@dataclass
class Run:
    plan: Plan
    report: LeakReport
    refs: dict[int, procs.NetnsRef] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(1 for o in self.outcomes if o.result == result)


# --- pure -------------------------------------------------------------------------------


def age_seconds(f: Flag) -> float | None:
    """How old the reason to end it is: the idle time of an idle connection,
    else the time in its state."""
    return f.idle_seconds if f.kind == "idle_established" else f.seconds


def select(flags: Iterable[Flag], kind: str | None = None, port: int | None = None,
           max_sockets: int = MAX_DEFAULT) -> Plan:
    """The flags of ``kind`` (any kind when None) on ``port`` (either end),
    without listeners, oldest first, capped at ``max_sockets``."""
    chosen = []
    listeners = 0
    for f in flags:
        if f.cookie is None or (kind is not None and f.kind != kind):
            continue
        if port is not None and port not in (f.lport, f.rport):
            continue
        if f.state == "LISTEN":
            listeners += 1
            continue
        chosen.append(f)
    chosen.sort(key=lambda f: (-(age_seconds(f) or 0.0), f.cookie))
    return Plan(chosen[:max_sockets], len(chosen), listeners)


def refusal(kind: str | None, pids: Iterable[int], port: int | None, threshold_given: bool,
            host_wide: bool = False) -> str | None:
    """Why a run must not act, or None.  A filter is ``--pid`` or ``--port``;
    acting on every process of the host takes a ``--kind`` with its
    threshold given explicitly *and* ``--host-wide``, so that a threshold
    typed for a test never ends other people's connections."""
    if list(pids) or port is not None:
        return None
    if kind is not None:
        flag = f"--{KIND_THRESHOLDS[kind].replace('_', '-')}"
        if threshold_given and host_wide:
            return None
        if threshold_given:
            return (f"refusing to end {kind} sockets of every process on the host: give --pid or --port, or add "
                    f"--host-wide to mean it")
        return (f"refusing to end sockets without a filter: give --pid or --port, or --kind {kind} with its "
                f"threshold ({flag} S) and --host-wide")
    return "refusing to end sockets without a filter: give --pid or --port with --state"


def recheck(f: Flag, state: str | None, idle_seconds: float | None, th: Thresholds) -> str | None:
    """Why a chosen socket must now be left alone, or None.  ``state`` and
    ``idle_seconds`` are the kernel's answer just now (``state`` None: gone,
    or its 4-tuple now names a socket with another cookie)."""
    if state is None:
        return "gone since the scan"
    if state == "LISTEN":
        return "a listener: never ended"
    if state != f.state:
        return f"now {state}, was {f.state}"
    if f.kind == "idle_established":
        if idle_seconds is None:
            return "idle time unknown now"
        if idle_seconds < th.idle_after:
            return f"carried data {idle_seconds:.1f}s ago, below --idle-after {th.idle_after:g}"
    return None


def inventory_row(f: Flag) -> np.ndarray:
    """A one-row INV_DTYPE array naming the flagged socket (for the exact
    lookup and the end request; interface 0: a socket bound to a device is not found, so left alone)."""
    row = np.zeros(1, sockdiag.INV_DTYPE)
    fam = socket.AF_INET6 if f.family == "ipv6" else socket.AF_INET
    row["cookie"], row["netns"], row["family"] = int(f.cookie or 0), int(f.netns or 0), fam
    row["state"] = TcpState[f.state].value if f.state in TcpState.__members__ else 0
    row["lport"], row["rport"] = int(f.lport or 0), int(f.rport or 0)
    for col, text in (("laddr", f.laddr), ("raddr", f.raddr)):
        raw = socket.inet_pton(fam, text or ("::" if fam == socket.AF_INET6 else "0.0.0.0"))
        row[col][0, : len(raw)] = np.frombuffer(raw, np.uint8)
    return row


# --- choosing -----------------------------------------------------------------------------


def choose(kind: str | None, th: Thresholds, pids: Iterable[int] = (), port: int | None = None,
           max_sockets: int = MAX_DEFAULT, state: str | None = None) -> Run:
    """Scan and select: the sockets ``tracer leaks`` flags as ``kind`` (or,
    with ``state``, every socket in that state held by ``pids`` or on ``port``)."""
    pids = tuple(pids)
    seen_refs: list[procs.NetnsRef] = []

    def netns_refs(scan: procs.FdScan, proc: str) -> list[procs.NetnsRef]:
        seen_refs[:] = procs.netns_refs(scan, proc)
        return list(seen_refs)

    if state is None:
        rep = Scanner(None, th, pids=pids, netns_refs=netns_refs, ports=(port,) if port else ()).scan()
        flags = rep.flags
    else:
        rep, flags = _state_flags(state, pids, port, netns_refs)
    run = Run(select(flags, kind, port, max_sockets), rep, {r.ino: r for r in seen_refs})
    return run


def _state_flags(state: str, pids: tuple[int, ...], port: int | None,
                 netns_refs: Callable[..., list[procs.NetnsRef]]) -> tuple[LeakReport, list[Flag]]:
    """Every socket in ``state`` in scope of ``pids`` (held, or queued on
    their listeners) and on ``port``, as flags of kind ``state``, with its
    holder and, where the kernel's clocks tell, a lower bound on its age."""
    rep = LeakReport(mono_ns=time.monotonic_ns(), wall=time.time())
    st = TcpState[state]
    fdscan = scan_fds(pids or None)
    refs = netns_refs(fdscan, procs.PROC)
    with Session(refs) as sess:
        inv = sess.dump(states=(1 << st.value) | (1 << TcpState.LISTEN.value))
        rep.errors.extend(inv.errors)
        rep.stats["netns_covered"] = len(sess.socks)
        rows = inv.rows
        owners = fdscan.sockets
        mask = scope_mask(rows, owners, pids, (port,) if port else ()) & (rows["state"] == st.value)
        sel = rows[mask]
        if len(sel) > MAX_SOCKET_FACTS:
            rep.errors.append(f"{len(sel)} sockets in {state}: only the first {MAX_SOCKET_FACTS} considered")
            sel = sel[:MAX_SOCKET_FACTS]
        lst = listeners(rows, owners)
        infos, _ = sess.tcp_info(sel) if len(sel) else (TcpInfoTable(), 0)
    out = []
    cache: dict[int, procs.ProcFacts] = {}
    for r in sel:  # bounded above
        held = owners.get(int(r["inode"]), []) if int(r["inode"]) else []
        backlog = not held and not int(r["inode"])
        if backlog:
            got = listener_of(lst, int(r["netns"]), int(r["lport"]), bytes(r["laddr"]), int(r["family"]))
            held = list(got[2]) if got else []
        pid, fd = min(held) if held else (None, None)
        info = infos.get(int(r["cookie"]))
        floor = kernel_state_floor(
            state, last_ack_recv_seconds=info.last_ack_recv_ms / 1e3 if info else None,
            backoff=info.backoff if info else None, rto_seconds=info.rto_us / 1e6 if info else None,
            timer=int(r["timer"]), expires_seconds=int(r["expires_ms"]) / 1e3,
            fin_timeout=inv.netns[int(r["netns"])].fin_timeout if int(r["netns"]) in inv.netns else None)
        if pid is not None and pid not in cache:
            cache[pid] = procs.facts(pid)
        out.append(Flag(
            kind="state", cookie=int(r["cookie"]), pid=pid, comm=cache[pid].comm if pid is not None else None,
            fd=None if backlog else fd, inode=int(r["inode"]) or None, state=state, seconds=floor,
            idle_seconds=info.idle_ms / 1e3 if info else None,
            laddr=address(int(r["family"]), bytes(r["laddr"])), lport=int(r["lport"]),
            raddr=address(int(r["family"]), bytes(r["raddr"])), rport=int(r["rport"]),
            family=family_name(int(r["family"])), held_by=("backlog" if backlog else "fd") if pid else None,
            at_least=True, netns=int(r["netns"]),
        ))
    rep.flags = ordered(out)
    return rep, rep.flags


# --- ending -------------------------------------------------------------------------------


def can_act() -> str | None:
    """Why this process cannot end sockets, or None: CAP_NET_ADMIN (bit 12
    of CapEff, include/uapi/linux/capability.h) is needed in the namespace's owner."""
    try:
        with open("/proc/self/status") as f:
            cap = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), 0)
    except OSError:
        return None  # let the kernel answer
    if not cap & (1 << 12):
        return "ending a socket needs CAP_NET_ADMIN: run as root (sudo)"
    return None


VIAS = ("sock_diag", "bpf")


def _recheck_one(sess: Session, f: Flag, th: Thresholds) -> tuple[str | None, np.ndarray]:
    """(why to leave it alone or None, the kernel's current row) of one chosen socket."""
    row = inventory_row(f)
    found, infos, _ = sess.lookup(row)
    now = found[found["cookie"] == row["cookie"][0]]
    state = TcpState.name_of(int(now["state"][0])) if len(now) else None
    info = infos.get(int(f.cookie or 0))
    return recheck(f, state, info.idle_ms / 1e3 if info else None, th), now


def _outcome(f: Flag, err: int, why: str) -> Outcome:
    if not err:
        return Outcome(f, ENDED)
    return Outcome(f, SKIPPED if err in (errno.ENOENT, errno.ESTALE) else FAILED, why)


def end(run: Run, th: Thresholds, on_outcome: Callable[[Outcome], None] = lambda o: None,
        via: str = "sock_diag") -> None:
    """End every target of ``run.plan``, each re-checked just before
    (:func:`recheck`), in its own namespace: with SOCK_DESTROY over sock_diag
    one by one, or (``via="bpf"``) with bpf_sock_destroy() in one iterator
    pass per namespace after the re-checks.  Raises DestroyRefused when the
    kernel or our capabilities forbid it (asked before the first socket)."""
    targets = run.plan.targets
    if not targets:
        return
    why = can_act()
    if why:
        raise DestroyRefused(why)
    if via == "sock_diag":
        err = probe()
        if err:
            raise DestroyRefused(explain(err))
        killer = Destroyer(run.refs)
    else:
        from pytracer.inventory.bpfdestroy import BpfEnder, BpfEnderUnavailable

        try:
            killer = BpfEnder(run.refs).__enter__()
        except BpfEnderUnavailable as exc:
            raise DestroyRefused(str(exc)) from None
    refs = [run.refs[ns] for ns in {int(f.netns or 0) for f in targets} if ns in run.refs]
    pending: dict[int, list[Flag]] = {}
    with Session(refs) as sess, killer:
        for f in targets:  # bounded by the cap
            reason, now = _recheck_one(sess, f, th)
            if reason:
                o = Outcome(f, SKIPPED, reason)
            elif via == "bpf":
                pending.setdefault(int(f.netns or 0), []).append(f)
                continue
            else:
                try:
                    killer.destroy(now[0])
                    o = Outcome(f, ENDED)
                except DestroyError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.EPERM):
                        raise DestroyRefused(exc.strerror or str(exc)) from None
                    o = _outcome(f, exc.errno or errno.EIO, exc.strerror or str(exc))
            run.outcomes.append(o)
            on_outcome(o)
        for netns, flags in pending.items():
            try:
                res = killer.end(netns, [int(f.cookie or 0) for f in flags])
            except OSError as exc:
                res = {int(f.cookie or 0): exc.errno or errno.EIO for f in flags}
            for f in flags:
                err = res.get(int(f.cookie or 0), errno.ENOENT)
                why = ("a minisocket (timewait or request): bpf_sock_destroy() cannot end it, use --via sock_diag"
                       if err == errno.EOPNOTSUPP else explain(err))
                o = _outcome(f, err, why)
                run.outcomes.append(o)
                on_outcome(o)
