"""Leak rules: facts in, flags with evidence out.  Pure.

Nothing here reads the kernel, /proc or the clock.  The library layer
(:mod:`pytracer.leaks.scanner`) gathers the facts: sockets joined from sock_diag,
the BPF socket table, tcp_info and /proc; processes; per-namespace sysctls.
The functions here decide what is wrong and say so in one plain sentence.

Time in state comes from one of two places, and the flag says which
(``at_least``):

* exact: the BPF program saw the transition (``state_ns``);
* a lower bound: the socket predates the tracer (seeded, birth unknown) or is
  not in the table, so we take the larger of "since the tracer first saw it"
  and what the kernel's own clocks prove (:func:`kernel_state_floor`).

Kinds (and the state or fact each looks at):

=====================  =====================================================
close_wait             CLOSE_WAIT longer than ``close_wait_after``, held by a
                       process fd (``held_by="fd"``) or sitting unaccepted
                       in a listener's backlog (``held_by="backlog"``)
idle_established       ESTABLISHED, no data either way for ``idle_after``
fin_wait2_orphan       FIN_WAIT2 with no file (closed by the app) for longer
                       than net.ipv4.tcp_fin_timeout
fin_wait2_stuck        FIN_WAIT2 still held by an fd (shutdown(SHUT_WR), never
                       closed) for longer than tcp_fin_timeout
last_ack_stuck         LAST_ACK longer than ``last_ack_after``
close_wait_growth      a process's CLOSE_WAIT count rising over successive polls
fd_exhaustion          open fds at ``fd_warn_ratio`` of RLIMIT_NOFILE
time_wait_pressure     TIME_WAIT sockets to one destination using
                       ``time_wait_warn_ratio`` of ip_local_port_range
idle_reset             a service whose connections end by a RST (or, as a
                       client, by the peer's FIN) after the same idle time
                       T, from the kernel's idle-before-end histograms
=====================  =====================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from pytracer.format import duration, endpoint, family_name
from pytracer.inventory.procs import ProcFacts
from pytracer.inventory.sockdiag import TIMER_TIMEWAIT
from pytracer.kernel.histogram import Histogram, slot_lower_us, slot_upper_us
from pytracer.leaks.thresholds import Thresholds

# include/net/tcp.h: TCP_TIMEWAIT_LEN, how long TIME_WAIT lasts.
TCP_TIMEWAIT_LEN_SECONDS = 60

KINDS = (
    "close_wait",
    "idle_established",
    "fin_wait2_orphan",
    "fin_wait2_stuck",
    "last_ack_stuck",
    "close_wait_growth",
    "fd_exhaustion",
    "time_wait_pressure",
    "idle_reset",
)


@dataclass
class Flag:
    kind: str
    cookie: int | None = None
    pid: int | None = None
    comm: str | None = None
    cmdline: str | None = None
    fd: int | None = None
    inode: int | None = None
    state: str | None = None
    seconds: float | None = None  # seconds in state (or the relevant age)
    idle_seconds: float | None = None
    laddr: str | None = None
    lport: int | None = None
    raddr: str | None = None
    rport: int | None = None
    family: str | None = None
    cgroup: str | None = None
    detail: str = ""
    held_by: str | None = None  # close_wait: "fd" or "backlog"
    at_least: bool = False  # seconds is a lower bound (socket predates the tracer)
    netns: int | None = None
    container: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Its fields as JSON values.  Made once: a flag is not changed once
        its rule has made it, and a carried flag (pytracer.leaks.idle_carry)
        is in many reports; the dict is shared, so do not change it."""
        # Not dataclasses.asdict(): its recursive deep copy was most of a report's cost with
        # thousands of flags.  Fields in their order; ``extra`` holds only JSON values.
        made = self.__dict__.get("_json")
        if made is not None:
            return made
        out = {k: v for k, v in self.__dict__.items() if k != "_json"}
        out["extra"] = dict(self.extra)
        for k in ("seconds", "idle_seconds"):
            if out[k] is not None:
                out[k] = round(out[k], 3)
        self.__dict__["_json"] = out
        return out


@dataclass
class SockFacts:
    """One socket, joined from sock_diag, the BPF table, tcp_info and /proc."""

    cookie: int
    netns: int
    family: int
    state: str
    laddr: str
    lport: int
    raddr: str
    rport: int
    inode: int  # 0: no file refers to it (orphan, or still in the accept queue)
    timer: int = 0
    expires_seconds: float = 0.0
    owners: list[tuple[int, int]] = field(default_factory=list)  # (pid, fd) holding it
    # Time in state: exact when the tracer saw the transition, else a floor.
    state_seconds: float | None = None
    state_exact: bool = False
    # tcp_info (None when not queried): seconds since the last data/ACK.
    idle_seconds: float | None = None
    last_ack_recv_seconds: float | None = None
    retransmits: int | None = None
    backoff: int | None = None
    rto_seconds: float | None = None
    # For a socket in an accept queue: the listener's holders and queue.
    listener_owners: list[tuple[int, int]] = field(default_factory=list)
    listener_backlog: tuple[int, int] | None = None  # (queued, limit)
    fin_timeout: int | None = None  # the namespace's net.ipv4.tcp_fin_timeout
    accepted: bool | None = None  # from the BPF table, when known

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SockFacts:
        d = dict(d)
        for k in ("owners", "listener_owners"):
            d[k] = [tuple(x) for x in d.get(k) or []]
        if d.get("listener_backlog") is not None:
            d["listener_backlog"] = tuple(d["listener_backlog"])
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def human(seconds: float | None) -> str:
    """A duration inside a sentence."""
    return duration(seconds, unknown="an unknown time")


# --- time in state -----------------------------------------------------------


def kernel_state_floor(state: str, *, last_ack_recv_seconds: float | None = None, backoff: int | None = None,
                       rto_seconds: float | None = None, timer: int = 0, expires_seconds: float = 0.0,
                       fin_timeout: int | None = None) -> float | None:
    """What the kernel's own clocks prove about time in the current state.

    * CLOSE_WAIT, FIN_WAIT2: the state began with an ACK from the peer (the
      FIN, resp. the ACK of our FIN), and tcp_ack() stamps every ACK it
      processes (tp->rcv_tstamp, tcp_info ``last_ack_recv``).  A later ACK only
      makes that clock younger, so it is a lower bound.
    * LAST_ACK, FIN_WAIT1, CLOSING: our FIN is unacknowledged and has been
      retransmitted ``backoff`` times with a doubling timeout; the current
      ``rto`` is base * 2**backoff, so at least rto * (1 - 2**-backoff) passed.
    * FIN_WAIT2 timewait minisockets: the timer was armed with tcp_fin_timeout,
      so fin_timeout - remaining has passed.
    """
    if timer == TIMER_TIMEWAIT:
        if state == "FIN_WAIT2" and fin_timeout is not None:
            return max(0.0, fin_timeout - expires_seconds)
        if state == "TIME_WAIT":
            return max(0.0, TCP_TIMEWAIT_LEN_SECONDS - expires_seconds)
        return None
    if state in ("CLOSE_WAIT", "FIN_WAIT2"):
        return last_ack_recv_seconds
    if state in ("LAST_ACK", "FIN_WAIT1", "CLOSING") and backoff and rto_seconds:
        return rto_seconds * (1.0 - 2.0 ** -backoff)
    return None


def combine_state_time(exact_seconds: float | None, seen_seconds: float | None,
                       kernel_floor: float | None) -> tuple[float | None, bool]:
    """(seconds in state, exact?).  An exact time wins; otherwise the largest
    lower bound we have."""
    if exact_seconds is not None:
        return exact_seconds, True
    bounds = [b for b in (seen_seconds, kernel_floor) if b is not None]
    return (max(bounds), False) if bounds else (None, False)


# --- socket flags ------------------------------------------------------------


def _base(kind: str, s: SockFacts, procs: Mapping[int, ProcFacts], owner: tuple[int, int] | None) -> Flag:
    p = procs.get(owner[0]) if owner else None
    return Flag(
        kind=kind,
        cookie=s.cookie,
        pid=owner[0] if owner else None,
        comm=p.comm if p else None,
        cmdline=p.cmdline if p else None,
        fd=None,
        inode=s.inode or None,
        state=s.state,
        seconds=s.state_seconds,
        idle_seconds=s.idle_seconds,
        laddr=s.laddr,
        lport=s.lport,
        raddr=s.raddr,
        rport=s.rport,
        family=family_name(s.family),
        cgroup=p.cgroup if p else None,
        container=p.container if p else None,
        at_least=not s.state_exact,
        netns=s.netns,
    )


def _age(s: SockFacts) -> str:
    return ("at least " if not s.state_exact else "") + human(s.state_seconds)


def who(pid: int | None, procs: Mapping[int, ProcFacts]) -> str:
    if pid is None:
        return "no visible process"
    p = procs.get(pid)
    return f"pid {pid} ({p.comm})" if p and p.comm else f"pid {pid}"


def _held(s: SockFacts) -> tuple[int, int] | None:
    return min(s.owners) if s.owners else None


def _extra_owners(flag: Flag, s: SockFacts) -> None:
    if len(s.owners) > 1:
        flag.extra["also_held_by"] = [{"pid": p, "fd": fd} for p, fd in sorted(s.owners)[1:]]


def close_wait_flag(s: SockFacts, procs: Mapping[int, ProcFacts], th: Thresholds) -> Flag | None:
    if s.state != "CLOSE_WAIT" or s.state_seconds is None or s.state_seconds < th.close_wait_after:
        return None
    if s.inode == 0 and s.accepted is not True:
        # No file refers to it: it was never accept()ed.  (A socket the app
        # accepted and then closed would have sent its FIN: LAST_ACK.)
        lst = min(s.listener_owners) if s.listener_owners else None
        f = _base("close_wait", s, procs, lst)
        f.held_by = "backlog"
        if lst:
            f.extra["listener_fd"] = lst[1]
        if s.listener_backlog:
            f.extra["backlog_queued"], f.extra["backlog_limit"] = s.listener_backlog
        where = f"the accept queue of {endpoint(s.laddr, s.lport)}"
        if lst:
            where += f" (listener fd {lst[1]} of {who(lst[0], procs)})"
        f.detail = (
            f"the peer closed the connection {_age(s)} ago while it still sat unaccepted in {where}: "
            "the process is not calling accept(), usually a stalled or overloaded accept loop."
        )
        return f
    owner = _held(s)
    f = _base("close_wait", s, procs, owner)
    f.held_by = "fd"
    _extra_owners(f, s)
    if owner:
        f.fd = owner[1]
        f.detail = (
            f"the peer closed the connection {_age(s)} ago but {who(owner[0], procs)} never closed fd {owner[1]}: "
            "usually an error path that skips close(), or a pool keeping connections to a backend that went away."
        )
    else:
        f.detail = (
            f"the peer closed the connection {_age(s)} ago and a socket file still refers to it, but no visible "
            "process holds it: an fd in flight over a unix socket, or a process in another pid namespace."
        )
    return f


def idle_flag(s: SockFacts, procs: Mapping[int, ProcFacts], th: Thresholds) -> Flag | None:
    if s.state != "ESTABLISHED" or s.idle_seconds is None or s.idle_seconds < th.idle_after:
        return None
    owner = _held(s)
    if owner is None and s.inode == 0 and s.listener_owners:
        f = _base("idle_established", s, procs, min(s.listener_owners))
        f.held_by = "backlog"
        f.extra["listener_fd"] = min(s.listener_owners)[1]
        f.detail = (
            f"connected but never accept()ed, and no data either way for {human(s.idle_seconds)}: "
            "the process is not draining its accept queue."
        )
        return f
    f = _base("idle_established", s, procs, owner)
    _extra_owners(f, s)
    if owner:
        f.fd, f.held_by = owner[1], "fd"
    f.detail = (
        f"no data in either direction for {human(s.idle_seconds)} on an open connection: an idle keep-alive, "
        "usually a client keep-alive timeout longer than the server's, or a pool that never retires connections."
    )
    return f


def fin_wait2_flag(s: SockFacts, procs: Mapping[int, ProcFacts], th: Thresholds) -> Flag | None:
    if s.state != "FIN_WAIT2" or s.state_seconds is None:
        return None
    limit = th.fin_wait2_after if th.fin_wait2_after is not None else s.fin_timeout
    if limit is None or s.state_seconds < limit:
        return None
    owner = _held(s)
    if owner is None:
        f = _base("fin_wait2_orphan", s, procs, None)
        f.detail = (
            f"closed by the application, and the peer has not sent its FIN for {_age(s)} "
            f"(tcp_fin_timeout {limit:g}s): usually a peer that vanished or never closes its side."
        )
        return f
    f = _base("fin_wait2_stuck", s, procs, owner)
    f.fd, f.held_by = owner[1], "fd"
    _extra_owners(f, s)
    f.detail = (
        f"{who(owner[0], procs)} shut down writing on fd {owner[1]} {_age(s)} ago and still holds it, "
        "but the peer never closed its side: usually the peer is itself leaking the connection in CLOSE_WAIT."
    )
    return f


def last_ack_flag(s: SockFacts, procs: Mapping[int, ProcFacts], th: Thresholds) -> Flag | None:
    if s.state != "LAST_ACK" or s.state_seconds is None or s.state_seconds < th.last_ack_after:
        return None
    f = _base("last_ack_stuck", s, procs, _held(s))
    if s.retransmits is not None:
        f.extra["retransmits"] = s.retransmits
    f.detail = (
        f"our FIN, sent after the peer's, has gone unacknowledged for {_age(s)}"
        + (f" ({s.backoff} retransmissions)" if s.backoff else "")
        + ": the peer vanished or a firewall drops its packets."
    )
    return f


SOCKET_RULES = (close_wait_flag, idle_flag, fin_wait2_flag, last_ack_flag)


def socket_flags(socks: Iterable[SockFacts], procs: Mapping[int, ProcFacts], th: Thresholds) -> list[Flag]:
    out = []
    for s in socks:
        for rule in SOCKET_RULES:
            f = rule(s, procs, th)
            if f is not None:
                out.append(f)
                break
    return out


# --- idle resets (per service, from the kernel's histograms) -----------------


def _peak(h: Histogram) -> tuple[int, int, int]:
    """(first slot, last slot, count) of the densest window of three
    adjacent slots: the most common idle time, give or take one bucket."""
    slots = h.slots
    best = (0, 0, 0)
    for i in range(len(slots)):
        n = sum(slots[max(0, i - 1): i + 2])
        if n > best[2]:
            lo = next(j for j in range(max(0, i - 1), i + 2) if slots[j])
            hi = max(j for j in range(max(0, i - 1), min(len(slots), i + 2)) if slots[j])
            best = (lo, hi, n)
    return best


def idle_reset_flags(services: Iterable[Any], procs: Mapping[int, ProcFacts], th: Thresholds) -> list[Flag]:
    """Services whose connections die at one idle time T.

    ``services``: objects with ``service`` (a port, or "other"), ``role``
    ("server" or "client"), ``idle`` (ender name -> Histogram of idle before
    end) and ``owners`` (ender name -> tgid of the last one ended), as
    :func:`pytracer.table.services.read` returns.

    The hits are the connections that ended by a RST received, and for a
    client also those the peer closed first: a server seeing its clients
    close idle connections is only their pool's own timeout.  A service is
    flagged when at least ``idle_reset_min_hits`` hits gather in one bucket
    and its neighbours (``idle_reset_peak`` of them), at an idle time of at
    least ``idle_reset_min_seconds``, while the local side's own closes (if
    any) come later than that: something between the two ends, or the peer,
    drops idle flows the local side still counts on.  T is the lower edge of
    that peak: a middlebox that forgets a flow after T resets it at the next
    packet, so resets come at T or a little after, never before.
    """
    out = []
    for s in services:
        if s.service == "other":
            continue
        resets = s.idle.get("reset_received", Histogram.empty())
        fins = s.idle.get("peer_fin", Histogram.empty()) if s.role == "client" else Histogram.empty()
        hits = resets + fins
        if hits.count < th.idle_reset_min_hits:
            continue
        lo, hi, n = _peak(hits)
        t, top = slot_lower_us(lo) / 1e6, slot_upper_us(hi) / 1e6
        if n < th.idle_reset_min_hits or n < th.idle_reset_peak * hits.count or t < th.idle_reset_min_seconds:
            continue
        local = s.idle.get("local_close", Histogram.empty())
        local_p90 = local.quantile(0.9)
        if local_p90 is not None and local_p90 < t:
            continue  # the local side already retires idle connections before T
        pid = s.owners.get("reset_received") or s.owners.get("peer_fin") or None
        port = int(s.service)
        what = ("reset" if not fins.count else "reset or closed by the peer" if resets.count else "closed by the peer")
        side = "connections accepted on port" if s.role == "server" else "connections to port"
        f = Flag(kind="idle_reset", pid=pid, comm=procs[pid].comm if pid in procs else None,
                 cmdline=procs[pid].cmdline if pid in procs else None, seconds=t, idle_seconds=t,
                 lport=port if s.role == "server" else None, rport=port if s.role == "client" else None)
        f.extra.update(service=s.service, role=s.role, t_seconds=round(t, 3), spread_seconds=round(top - t, 3),
                       hits=n, resets=resets.count, peer_fins=fins.count,
                       local_close_p90_seconds=None if local_p90 is None else round(local_p90, 3))
        f.detail = (
            f"{n} {side} {s.service} were {what} after {human(t)} to {human(top)} idle, "
            f"while {who(pid, procs)} kept idle connections longer: something on the path (a NAT, load balancer "
            f"or firewall) or the peer drops flows idle for about {human(t)}. "
            f"Fix: set an idle timeout or TCP keepalive below {human(t)} on the side that pools "
            f"({who(pid, procs)})."
        )
        out.append(f)
    return out


# --- ordering -------------------------------------------------------------------


def ordered(flags: Iterable[Flag]) -> list[Flag]:
    """Most urgent first: process-level trends, then sockets by age."""
    rank = {k: i for i, k in enumerate(
        ("fd_exhaustion", "close_wait_growth", "idle_reset", "time_wait_pressure", "close_wait", "last_ack_stuck",
         "fin_wait2_stuck", "fin_wait2_orphan", "idle_established"))}
    return sorted(flags, key=lambda f: (rank.get(f.kind, 99), -(f.seconds or 0.0), f.pid or 0, f.cookie or 0))
