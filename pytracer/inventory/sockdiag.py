"""The TCP socket inventory, from the kernel's sock_diag netlink interface.

(One module of ~900 lines on purpose: it is the one description of the
sock_diag wire format and the one netlink transport that speaks it; the
parsers share private header layouts and offsets with the requests.)

It answers two questions:

* **What TCP sockets exist** (every state, IPv4 and IPv6, in every network
  namespace we can enter): one ``SOCK_DIAG_BY_FAMILY`` dump per family and
  namespace, always with an explicit ``family`` and ``states`` mask.  Rows come
  back as one numpy structured array (:data:`INV_DTYPE`) carrying the socket
  cookie (the key the BPF side uses), state, 5-tuple, inode (0 for sockets no
  file refers to: orphans and sockets still in a listener's accept queue),
  queue sizes (for a listener: accept backlog length and limit), timer, and
  the namespace inode.
* **tcp_info for a few candidates**: exact lookups (full 4-tuple plus
  cookie, no dump) asking for ``INET_DIAG_INFO``, which gives the kernel's
  ``last_data_recv`` / ``last_data_sent`` / ``last_ack_recv`` clocks.  Only the
  sockets the detectors care about are queried.

Messages are declared here as data, field lists in pyroute2's notation
(``inet_diag_req``, ``inet_diag_msg`` and its ``tcp_info``, mirroring
include/uapi/linux/inet_diag.h and tcp.h); requests are encoded from them,
and the numpy dtype and tcp_info offsets are derived from them, so there is
one description of the wire format.  tests/unit/inventory/test_sockdiag.py checks it
field by field against pyroute2's own declarations.  pyroute2 itself is not
imported here (only by :mod:`pytracer.inventory.destroy`, to end a socket):
the whole package costs about 20 MB of memory and 0.3 s of start-up, and
its per-message objects cost 30-115 us per socket
(measured with pyroute2 0.9.7: 0.35 s for 3,000 sockets), which a
TIME_WAIT storm of 30,000 sockets turns into seconds per scan.  The
transport is a plain netlink socket, parsed in bulk (about 1 us per socket).

Network namespaces: a netlink socket answers for the namespace it was
created in.  For each other namespace (found by :mod:`pytracer.inventory.procs`), a
short-lived thread enters it with setns(2) (which changes only the calling
thread), creates the socket, reads that namespace's sysctls
(``ip_local_port_range``, ``tcp_fin_timeout``, ``tcp_tw_reuse``,
``tcp_max_tw_buckets``; /proc/sys/net answers for the reader's namespace),
returns to its own namespace and exits.  The sockets are closed when the
:class:`Session` ends, so no namespace is kept alive by us.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
import threading
import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from pytracer.arrays import Rows, fields_of, find_sorted
from pytracer.format import AF_INET, AF_INET6
from pytracer.inventory.procs import NetnsRef
from pytracer.kernel.environment import NETNS_NOTE, say_once
from pytracer.kernel.tcp_states import TcpState

# include/uapi/linux/netlink.h, sock_diag.h
NETLINK_SOCK_DIAG = 4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
SOCK_DIAG_BY_FAMILY = 20

# struct inet_diag_req_v2 (include/uapi/linux/inet_diag.h), after the nlmsghdr.
INET_DIAG_REQ_FIELDS = (
    ("sdiag_family", "B"), ("sdiag_protocol", "B"), ("idiag_ext", "B"), ("__pad", "B"), ("idiag_states", "I"),
    # struct inet_diag_sockid
    ("idiag_sport", ">H"), ("idiag_dport", ">H"), ("idiag_src", ">4I"), ("idiag_dst", ">4I"), ("idiag_if", "I"),
    ("idiag_cookie", "Q"),
)
# struct inet_diag_msg
INET_DIAG_MSG_FIELDS = (
    ("idiag_family", "B"), ("idiag_state", "B"), ("idiag_timer", "B"), ("idiag_retrans", "B"),
    ("idiag_sport", ">H"), ("idiag_dport", ">H"), ("idiag_src", ">4I"), ("idiag_dst", ">4I"), ("idiag_if", "I"),
    ("idiag_cookie", "Q"),
    ("idiag_expires", "I"), ("idiag_rqueue", "I"), ("idiag_wqueue", "I"), ("idiag_uid", "I"), ("idiag_inode", "I"),
)
# struct tcp_info (include/uapi/linux/tcp.h); the bitfield bytes
# (snd/rcv_wscale, delivery_rate_app_limited + fastopen_client_fail) as whole bytes.
TCP_INFO_FIELDS = (
    ("tcpi_state", "B"), ("tcpi_ca_state", "B"), ("tcpi_retransmits", "B"), ("tcpi_probes", "B"),
    ("tcpi_backoff", "B"), ("tcpi_options", "B"), ("tcpi_snd_wscale", "B"), ("tcpi_delivery_rate_app_limited", "B"),
    ("tcpi_rto", "I"), ("tcpi_ato", "I"), ("tcpi_snd_mss", "I"), ("tcpi_rcv_mss", "I"),
    ("tcpi_unacked", "I"), ("tcpi_sacked", "I"), ("tcpi_lost", "I"), ("tcpi_retrans", "I"), ("tcpi_fackets", "I"),
    ("tcpi_last_data_sent", "I"), ("tcpi_last_ack_sent", "I"), ("tcpi_last_data_recv", "I"),
    ("tcpi_last_ack_recv", "I"),
    ("tcpi_pmtu", "I"), ("tcpi_rcv_ssthresh", "I"), ("tcpi_rtt", "I"), ("tcpi_rttvar", "I"),
    ("tcpi_snd_ssthresh", "I"), ("tcpi_snd_cwnd", "I"), ("tcpi_advmss", "I"), ("tcpi_reordering", "I"),
    ("tcpi_rcv_rtt", "I"), ("tcpi_rcv_space", "I"), ("tcpi_total_retrans", "I"),
    ("tcpi_pacing_rate", "Q"), ("tcpi_max_pacing_rate", "Q"), ("tcpi_bytes_acked", "Q"),
    ("tcpi_bytes_received", "Q"), ("tcpi_segs_out", "I"), ("tcpi_segs_in", "I"), ("tcpi_notsent_bytes", "I"),
    ("tcpi_min_rtt", "I"), ("tcpi_data_segs_in", "I"), ("tcpi_data_segs_out", "I"), ("tcpi_delivery_rate", "Q"),
    ("tcpi_busy_time", "Q"), ("tcpi_rwnd_limited", "Q"), ("tcpi_sndbuf_limited", "Q"), ("tcpi_delivered", "I"),
    ("tcpi_delivered_ce", "I"), ("tcpi_bytes_sent", "Q"), ("tcpi_bytes_retrans", "Q"), ("tcpi_dsack_dups", "I"),
    ("tcpi_reord_seen", "I"), ("tcpi_rcv_ooopack", "I"), ("tcpi_snd_wnd", "I"),
)

IPPROTO_TCP = socket.IPPROTO_TCP
T = TypeVar("T")
CLONE_NEWNET = 0x40000000

# include/uapi/linux/inet_diag.h: extension bits are 1 << (attr - 1).
INET_DIAG_INFO = 2
INET_DIAG_EXT_INFO = 1 << (INET_DIAG_INFO - 1)
# idiag_timer values (net/ipv4/inet_diag.c, tcp_diag.c).
TIMER_NONE, TIMER_RETRANS, TIMER_KEEPALIVE, TIMER_TIMEWAIT, TIMER_PROBE = 0, 1, 2, 3, 4
# INET_DIAG_NOCOOKIE: skip the cookie check in an exact lookup.
NOCOOKIE = 0xFFFFFFFFFFFFFFFF

# Every real TCP state, 1..NEW_SYN_RECV (TCPF_ALL = 0xFFF).  TIME_WAIT also
# selects FIN_WAIT2 timewait minisockets (orphans after close()), which the
# kernel reports with state FIN_WAIT2 and timer TIMER_TIMEWAIT.  BOUND_INACTIVE
# (v6.9+, bound but neither listening nor connecting) is left out: those are
# not connections.
ALL_STATES = sum(1 << int(s) for s in TcpState if s != TcpState.BOUND_INACTIVE)

_NLMSGHDR = struct.Struct("=IHHII")
_NLMSG_LTS = struct.Struct("=IH2xI")  # length, type, sequence
_RTATTR = struct.Struct("=HH")
_REQ_ID_OFFSET = 16 + 8  # nlmsghdr + family/protocol/ext/pad/states
_BATCH = 32  # exact lookups per send()
MAX_ROWS = 4_000_000  # bound on one dump


class SockDiagError(OSError):
    """A sock_diag request failed; ``errno`` holds the kernel's reason (EBADMSG: the
    reply itself was malformed, and nothing of that datagram is trusted)."""


def _malformed(what: str, off: int, n: int) -> SockDiagError:
    return SockDiagError(errno.EBADMSG, f"sock_diag: malformed reply ({what} at byte {off} of {n})")


def _frame(buf: bytes, off: int, n: int) -> tuple[int, int, int]:
    """(length, type, sequence) of the netlink message at ``off``; a header
    whose length does not fit the datagram is refused, never skipped."""
    length, typ, mseq = _NLMSG_LTS.unpack_from(buf, off)
    if length < 16 or off + length > n:
        raise _malformed(f"message claiming {length} bytes", off, n)
    return length, typ, mseq


def _nlmsg_errno(buf: bytes, off: int, length: int) -> int:
    """The (positive) errno of an NLMSG_ERROR message; 0 is an acknowledgement."""
    if length < 20:
        raise _malformed(f"NLMSG_ERROR of {length} bytes", off, len(buf))
    code = struct.unpack_from("=i", buf, off + 16)[0]
    if code > 0:
        raise _malformed(f"NLMSG_ERROR with code {code}", off, len(buf))
    return -code


def _check_end(off: int, n: int) -> None:
    if off < n:  # 1..15 bytes that cannot be a message
        raise _malformed(f"{n - off} trailing bytes", off, n)


# --- the wire format, derived from the declarations above -------------------


def _dtype_from_fields(fields: Iterable[tuple[str, str]]) -> np.dtype:
    """numpy dtype for a ``fields`` tuple (pyroute2's notation).  Multi-word big-endian
    fields (addresses) stay raw network-order bytes."""
    out = []
    for name, fmt in fields:
        order = ">" if fmt.startswith(">") else "="
        body = fmt.lstrip("<>=!")
        count = int(body[:-1]) if len(body) > 1 else 1
        code = body[-1]
        size = struct.calcsize("=" + code)
        kind = {"B": "u", "H": "u", "I": "u", "Q": "u", "b": "i", "h": "i", "i": "i", "q": "i"}[code]
        if count > 1:
            out.append((name, "u1", (count * size,)))
        else:
            out.append((name, f"{order}{kind}{size}"))
    return np.dtype(out)


MSG_DTYPE = _dtype_from_fields(INET_DIAG_MSG_FIELDS)


def _c_offsets(fields: Iterable[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """name -> (offset, struct format) with C natural alignment."""
    out = {}
    off = 0
    for name, fmt in fields:
        size = struct.calcsize("=" + fmt.lstrip("<>=!"))
        off = (off + size - 1) // size * size
        out[name] = (off, "=" + fmt.lstrip("<>=!"))
        off += size
    return out


TCP_INFO_OFFSETS = _c_offsets(TCP_INFO_FIELDS)

# The inventory: one row per socket, host-order fields, plus its namespace.
INV_DTYPE = np.dtype(
    [
        ("cookie", "u8"),
        ("netns", "u8"),
        ("family", "u1"),
        ("state", "u1"),
        ("timer", "u1"),
        ("retrans", "u1"),
        ("lport", "u2"),
        ("rport", "u2"),
        ("laddr", "u1", (16,)),
        ("raddr", "u1", (16,)),
        ("ifindex", "u4"),
        ("expires_ms", "u4"),
        ("rqueue", "u4"),
        ("wqueue", "u4"),
        ("uid", "u4"),
        ("inode", "u4"),
    ]
)


# What finds a socket again by exact lookup (:meth:`Session.lookup`,
# :meth:`Session.tcp_info`): the key columns of INV_DTYPE, packed (58 bytes).
LOOKUP_FIELDS = ("cookie", "netns", "family", "state", "lport", "rport", "laddr", "raddr", "ifindex")
LOOKUP_DTYPE = fields_of(INV_DTYPE, LOOKUP_FIELDS)


def lookup_keys(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """LOOKUP_DTYPE of ``rows[idx]`` (INV_DTYPE), a column at a time: the
    whole rows are never copied."""
    out = np.empty(len(idx), LOOKUP_DTYPE)
    for name in LOOKUP_FIELDS:
        out[name] = rows[name][idx]
    return out


# What a dump with INET_DIAG_INFO needs of the sockets it is for (10 bytes).
_DUMP_KEY_DTYPE = np.dtype([("cookie", "u8"), ("family", "u1"), ("state", "u1")])


def _dump_keys(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.empty(len(idx), _DUMP_KEY_DTYPE)
    for name in _DUMP_KEY_DTYPE.names:
        out[name] = rows[name][idx]
    return out


_HDR_DTYPE = np.dtype([("len", "=u4"), ("type", "=u2"), ("flags", "=u2"), ("seq", "=u4"), ("pid", "=u4")])


def parse_dump(buf: bytes, seq: int | None = None) -> tuple[np.ndarray, bool, int]:
    """Parse one netlink datagram of a sock_diag reply.

    Returns (rows as MSG_DTYPE, done, error): ``done`` once NLMSG_DONE is
    seen, ``error`` the (positive) errno of an NLMSG_ERROR, else 0.  A
    malformed datagram (a message overrunning it, a short inet_diag_msg or
    error message, trailing bytes) raises :class:`SockDiagError` (EBADMSG).

    A dump's messages mostly have one length (same family, same
    attributes), so runs of equal-length messages are checked and viewed
    with numpy strides at once; only where the length changes (e.g. a
    timewait socket among full ones) is a message read on its own.
    """
    runs: list[np.ndarray] = []
    done = False
    err = 0
    off = 0
    n = len(buf)
    need = 16 + MSG_DTYPE.itemsize
    # Bounded by the buffer: every round consumes at least one message.
    while off + 16 <= n:
        length, typ, mseq = _frame(buf, off, n)
        step = (length + 3) & ~3
        if typ == SOCK_DIAG_BY_FAMILY and (seq is None or mseq == seq):
            if length < need:
                raise _malformed(f"inet_diag_msg of {length} bytes", off, n)
            k = (n - off - length) // step + 1  # messages of this length that would fit
            if k > 1:
                hdr = np.ndarray((k,), dtype=_HDR_DTYPE, buffer=buf, offset=off, strides=(step,))
                good = (hdr["len"] == length) & (hdr["type"] == SOCK_DIAG_BY_FAMILY)
                if seq is not None:
                    good &= hdr["seq"] == seq
                k = k if good.all() else int(np.argmin(good))
            runs.append(np.ndarray((k,), dtype=MSG_DTYPE, buffer=buf, offset=off + 16, strides=(step,)))
            off += k * step
            continue
        if seq is None or mseq == seq:
            if typ == NLMSG_DONE:
                done = True
            elif typ == NLMSG_ERROR:
                err = _nlmsg_errno(buf, off, length)
                done = True
        off += step
    _check_end(off, n)
    if not runs:
        return np.zeros(0, MSG_DTYPE), done, err
    return np.concatenate(runs), done, err


def _cookies_of(msgs: np.ndarray) -> np.ndarray:
    cookie = msgs["idiag_cookie"].astype(np.uint64)
    if sys.byteorder == "big":
        cookie = (cookie << np.uint64(32)) | (cookie >> np.uint64(32))
    return cookie


def to_inventory(msgs: np.ndarray, netns: int) -> np.ndarray:
    """MSG_DTYPE rows -> INV_DTYPE rows of one namespace."""
    out = np.zeros(len(msgs), INV_DTYPE)
    if not len(msgs):
        return out
    # The kernel sends cookie[0] = low 32 bits, cookie[1] = high (native u32s).
    out["cookie"] = _cookies_of(msgs)
    out["netns"] = netns
    out["family"] = msgs["idiag_family"]
    out["state"] = msgs["idiag_state"]
    out["timer"] = msgs["idiag_timer"]
    out["retrans"] = msgs["idiag_retrans"]
    out["lport"] = msgs["idiag_sport"]
    out["rport"] = msgs["idiag_dport"]
    out["laddr"] = msgs["idiag_src"]
    out["raddr"] = msgs["idiag_dst"]
    out["ifindex"] = msgs["idiag_if"]
    out["expires_ms"] = msgs["idiag_expires"]
    out["rqueue"] = msgs["idiag_rqueue"]
    out["wqueue"] = msgs["idiag_wqueue"]
    out["uid"] = msgs["idiag_uid"]
    out["inode"] = msgs["idiag_inode"]
    return out


@dataclass
class TcpInfo:
    """The parts of struct tcp_info the detectors use.  Times in milliseconds
    are "how long ago" (jiffies resolution)."""

    state: int
    retransmits: int
    probes: int
    backoff: int
    rto_us: int
    unacked: int
    last_data_sent_ms: int
    last_data_recv_ms: int
    last_ack_recv_ms: int
    rtt_us: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None

    @property
    def idle_ms(self) -> int:
        """No data either way for this long."""
        return min(self.last_data_sent_ms, self.last_data_recv_ms)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def decode_tcp_info(payload: bytes) -> TcpInfo | None:
    """struct tcp_info (include/uapi/linux/tcp.h) at the offsets
    :data:`TCP_INFO_FIELDS` declares; fields past the end of an older kernel's struct are None."""

    def get(name: str) -> int | None:
        off, fmt = TCP_INFO_OFFSETS[name]
        if off + struct.calcsize(fmt) > len(payload):
            return None
        return struct.unpack_from(fmt, payload, off)[0]

    need = ("tcpi_state", "tcpi_retransmits", "tcpi_probes", "tcpi_backoff", "tcpi_rto", "tcpi_unacked",
            "tcpi_last_data_sent", "tcpi_last_data_recv", "tcpi_last_ack_recv")
    vals = [get(n) for n in need]
    if any(v is None for v in vals):
        return None
    return TcpInfo(*vals, rtt_us=get("tcpi_rtt"), bytes_acked=get("tcpi_bytes_acked"),  # type: ignore[arg-type]
                   bytes_received=get("tcpi_bytes_received"))


# TcpInfo attribute -> struct tcp_info field; the last three are newer (None when absent).
_INFO_FIELDS = (
    ("state", "tcpi_state"), ("retransmits", "tcpi_retransmits"), ("probes", "tcpi_probes"),
    ("backoff", "tcpi_backoff"), ("rto_us", "tcpi_rto"), ("unacked", "tcpi_unacked"),
    ("last_data_sent_ms", "tcpi_last_data_sent"), ("last_data_recv_ms", "tcpi_last_data_recv"),
    ("last_ack_recv_ms", "tcpi_last_ack_recv"), ("rtt_us", "tcpi_rtt"), ("bytes_acked", "tcpi_bytes_acked"),
    ("bytes_received", "tcpi_bytes_received"),
)
_INFO_REQUIRED = 9  # the first nine: without them there is no answer


def _field_end(name: str) -> int:
    off, fmt = TCP_INFO_OFFSETS[name]
    return off + struct.calcsize(fmt)


_INFO_KEEP = max(_field_end(f) for _, f in _INFO_FIELDS)  # bytes of tcp_info kept per socket
_INFO_NEED = max(_field_end(f) for _, f in _INFO_FIELDS[:_INFO_REQUIRED])
_INFO_DTYPE = np.dtype({
    "names": [a for a, _ in _INFO_FIELDS],
    "formats": [TCP_INFO_OFFSETS[f][1] for _, f in _INFO_FIELDS],
    "offsets": [TCP_INFO_OFFSETS[f][0] for _, f in _INFO_FIELDS],
    "itemsize": _INFO_KEEP,
})


_U32 = struct.Struct("=I")
_SENT_AT, _RECV_AT = TCP_INFO_OFFSETS["tcpi_last_data_sent"][0], TCP_INFO_OFFSETS["tcpi_last_data_recv"][0]
_ESTABLISHED = int(TcpState.ESTABLISHED)


class TcpInfoTable(Mapping):
    """cookie -> :class:`TcpInfo`, for many sockets at once.

    A dump with tcp_info can answer for 100k sockets; one TcpInfo object
    each would cost ~30 MB.  This keeps the first bytes of each struct
    tcp_info in one buffer (under 150 bytes per socket), answers bulk
    questions with numpy (:meth:`idle_ms`), and builds a TcpInfo only for
    a socket that is looked up.

    With ``brief_below_ms``, an ESTABLISHED socket idle for less than that
    keeps only its idle time (12 bytes): a leak scan asks every ESTABLISHED
    candidate when it could be idle, and needs the rest of tcp_info only
    for the ones that are.  Such a socket is in :meth:`idle_ms` and
    :attr:`answered`, not in the mapping.
    """

    def __init__(self, brief_below_ms: int | None = None) -> None:
        self.brief_below_ms = brief_below_ms
        self._cookies = array("Q")
        self._raw = bytearray()
        self._lens = array("H")
        self._brief_cookies = array("Q")
        self._brief_idle = array("I")
        self._frozen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def answered(self) -> int:
        """Sockets answered for: in the mapping, or kept brief."""
        return len(self._cookies) + len(self._brief_cookies)

    def add(self, cookie: int, payload: bytes) -> bool:
        """Keep one socket's tcp_info; False (and nothing kept) when it is
        too short to hold the fields every answer needs."""
        if len(payload) < _INFO_NEED:
            return False
        if self.brief_below_ms is not None and payload[0] == _ESTABLISHED:
            idle = min(_U32.unpack_from(payload, _SENT_AT)[0], _U32.unpack_from(payload, _RECV_AT)[0])
            if idle < self.brief_below_ms:
                self._brief_cookies.append(cookie)
                self._brief_idle.append(idle)
                return True
        n = min(len(payload), _INFO_KEEP)
        self._cookies.append(cookie)
        self._raw += payload[:n]
        if n < _INFO_KEEP:
            self._raw += bytes(_INFO_KEEP - n)
        self._lens.append(n)
        self._frozen = None
        return True

    def add_info(self, cookie: int, info: TcpInfo) -> None:
        rec = np.zeros(1, _INFO_DTYPE)
        for attr, _ in _INFO_FIELDS:
            v = getattr(info, attr)
            rec[attr] = 0 if v is None else v
        n = _INFO_KEEP if info.bytes_received is not None else _INFO_NEED
        self.add(cookie, rec.tobytes()[:n])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._frozen is None:
            cookies = np.frombuffer(self._cookies, np.uint64) if len(self._cookies) else np.zeros(0, np.uint64)
            rows = np.frombuffer(self._raw, _INFO_DTYPE) if self._raw else np.zeros(0, _INFO_DTYPE)
            lens = np.frombuffer(self._lens, np.uint16) if len(self._lens) else np.zeros(0, np.uint16)
            # The last answer for a cookie wins.
            order = np.argsort(cookies, kind="stable")[::-1]
            _, first = np.unique(cookies[order], return_index=True)
            keep = order[first]
            self._frozen = (cookies[keep], rows[keep], lens[keep])
        return self._frozen

    def _pos(self, cookies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = self._arrays()[0]
        return find_sorted(keys, np.asarray(cookies, dtype=np.uint64))

    def idle_ms(self, cookies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, ms without data either way) for each cookie."""
        cookies = np.asarray(cookies, dtype=np.uint64)
        pos, found = self._pos(cookies)
        rows = self._arrays()[1]
        idle = (np.minimum(rows["last_data_sent_ms"][pos], rows["last_data_recv_ms"][pos]).astype(np.int64)
                if len(rows) else np.zeros(len(found), np.int64))
        if len(self._brief_cookies):
            keys = np.frombuffer(self._brief_cookies, np.uint64)
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            bpos, bhit = find_sorted(keys, cookies)
            bfound = ~found & bhit
            idle[bfound] = np.frombuffer(self._brief_idle, np.uint32)[order][bpos[bfound]]
            found = found | bfound
        return found, idle

    def __getitem__(self, cookie: int) -> TcpInfo:
        if not isinstance(cookie, (int, np.integer)) or not 0 <= int(cookie) <= 0xFFFFFFFFFFFFFFFF:
            raise KeyError(cookie)
        pos, found = self._pos(np.array([int(cookie)], dtype=np.uint64))
        if not found[0]:
            raise KeyError(cookie)
        _, rows, lens = self._arrays()
        rec, n = rows[pos[0]], int(lens[pos[0]])
        vals = {a: (int(rec[a]) if i < _INFO_REQUIRED or _field_end(f) <= n else None)
                for i, (a, f) in enumerate(_INFO_FIELDS)}
        return TcpInfo(**vals)

    def __contains__(self, cookie: object) -> bool:
        try:
            self[cookie]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(self._arrays()[0].tolist())

    def __len__(self) -> int:
        return len(self._arrays()[0])


def _attrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    out = {}
    off = start
    while off + 4 <= end:
        length, typ = _RTATTR.unpack_from(buf, off)
        if length < 4 or off + length > end:
            raise _malformed(f"attribute claiming {length} bytes", off, end)
        out[typ & 0x3FFF] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def _request(family: int, states: int, ext: int, flags: int, seq: int) -> bytearray:
    """An inet_diag_req_v2 for every socket of ``family`` in ``states``
    (ports, addresses and interface zero: a dump, or a template that
    :meth:`Session._lookup_batch` fills in for an exact lookup)."""
    body = struct.pack("=BBBBI", family, IPPROTO_TCP, ext, 0, states) + bytes(4 + 32 + 4) + struct.pack("=Q", NOCOOKIE)
    return bytearray(_NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body)


def _sockid(row: np.void) -> bytes:
    """struct inet_diag_sockid for an exact lookup of an inventory row."""
    cookie = int(row["cookie"])
    return (
        struct.pack(">HH", int(row["lport"]), int(row["rport"]))
        + bytes(row["laddr"])
        + bytes(row["raddr"])
        + struct.pack("=III", int(row["ifindex"]), cookie & 0xFFFFFFFF, cookie >> 32)
    )


# --- namespaces and sysctls --------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        need = " (needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""
        raise OSError(err, f"setns: {os.strerror(err)}{need}")


@dataclass
class NetnsInfo:
    ino: int
    label: str
    path: str
    port_range: tuple[int, int] | None = None  # net.ipv4.ip_local_port_range
    fin_timeout: int | None = None  # net.ipv4.tcp_fin_timeout, seconds
    tw_reuse: int | None = None  # net.ipv4.tcp_tw_reuse
    max_tw_buckets: int | None = None  # net.ipv4.tcp_max_tw_buckets
    error: str | None = None

    @property
    def port_range_size(self) -> int | None:
        if self.port_range is None:
            return None
        return self.port_range[1] - self.port_range[0] + 1

    def to_json(self) -> dict:
        return {
            "netns": self.ino,
            "label": self.label,
            "port_range": list(self.port_range) if self.port_range else None,
            "fin_timeout_seconds": self.fin_timeout,
            "tw_reuse": self.tw_reuse,
            "max_tw_buckets": self.max_tw_buckets,
            "error": self.error,
        }


def _read_sysctls(info: NetnsInfo) -> None:
    def ints(name: str) -> list[int] | None:
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return None

    pr = ints("ip_local_port_range")
    if pr and len(pr) == 2:
        info.port_range = (pr[0], pr[1])
    for name, attr in (("tcp_fin_timeout", "fin_timeout"), ("tcp_tw_reuse", "tw_reuse"),
                       ("tcp_max_tw_buckets", "max_tw_buckets")):
        v = ints(name)
        if v:
            setattr(info, attr, v[0])


def _diag_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE (root), else capped by rmem_max
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 1 << 21)
            break
        except OSError:
            continue
    s.bind((0, 0))
    return s


def own_netns() -> int:
    """The inode of the calling thread's network namespace (-1 if unreadable)."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return -1


def run_in_netns(ref: NetnsRef, fn: Callable[[], T], timeout: float = 5.0) -> T:
    """``fn()`` run inside the namespace ``ref`` names, by a short-lived
    thread that enters it with setns(2) (which changes only the calling
    thread), calls ``fn``, returns to its own namespace and exits.  What
    ``fn`` creates there (a socket) stays in that namespace.  Raises
    OSError when the namespace cannot be entered, changed under its path,
    or the thread does not finish within ``timeout``."""
    result: list[T] = []
    errors: list[OSError] = []

    def work() -> None:
        home = target = -1
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(target).st_ino != ref.ino:
                errors.append(OSError(errno.ESTALE, "namespace changed under its path"))
                return
            _setns(target)
            try:
                result.append(fn())
            finally:
                _setns(home)
        except OSError as exc:
            errors.append(exc)
        finally:
            for fd in (home, target):
                if fd >= 0:
                    os.close(fd)

    t = threading.Thread(target=work, name=f"pytracer-netns-{ref.ino}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise OSError(errno.ETIMEDOUT, "timed out entering the namespace")
    if errors:
        raise errors[0]
    return result[0]


def _open_in(ref: NetnsRef, info: NetnsInfo, timeout: float) -> socket.socket | None:
    """Create a sock_diag socket inside another namespace, and read its sysctls there (see module doc)."""

    def open_there() -> socket.socket:
        sock = _diag_socket()
        _read_sysctls(info)
        return sock

    try:
        return run_in_netns(ref, open_there, timeout)
    except OSError as exc:
        info.error = exc.strerror or str(exc)
        return None


# --- the session -------------------------------------------------------------


@dataclass
class Inventory:
    rows: np.ndarray  # INV_DTYPE
    netns: dict[int, NetnsInfo] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def state_counts(self) -> dict[str, int]:
        counts = np.bincount(self.rows["state"], minlength=16)
        return {TcpState.name_of(s): int(n) for s, n in enumerate(counts) if n}


class Session:
    """sock_diag sockets for a set of namespaces, for the length of one scan.

    >>> with Session(refs) as s:          # doctest: +SKIP
    ...     inv = s.dump()
    ...     infos = s.tcp_info(inv.rows[inv.rows["state"] == 8])
    """

    def __init__(self, refs: Iterable[NetnsRef], timeout: float = 5.0) -> None:
        self.refs = list(refs)
        self.timeout = timeout
        self.socks: dict[int, socket.socket] = {}
        self.netns: dict[int, NetnsInfo] = {}
        self.errors: list[str] = []
        self._seq = int(time.monotonic_ns()) & 0x7FFFFFFF

    def __enter__(self) -> Session:
        own = own_netns()
        for ref in self.refs:
            info = NetnsInfo(ref.ino, ref.label, ref.path)
            self.netns[ref.ino] = info
            try:
                if ref.ino == own:
                    sock: socket.socket | None = _diag_socket()
                    _read_sysctls(info)
                else:
                    sock = _open_in(ref, info, self.timeout)
            except OSError as exc:
                info.error = exc.strerror or str(exc)
                sock = None
            if sock is None:
                self.errors.append(f"{ref.label} (netns {ref.ino}): {info.error or 'unavailable'}")
                if "CAP_SYS_ADMIN" in (info.error or ""):
                    say_once("netns", NETNS_NOTE)
                continue
            sock.settimeout(self.timeout)
            self.socks[ref.ino] = sock
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks = {}

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    # -- dumps -----------------------------------------------------------

    def _dump_one(self, sock: socket.socket, family: int, states: int, max_rows: int,
                  convert: Callable[[np.ndarray], np.ndarray], into: Rows) -> None:
        """One dump, appended to ``into``; each datagram's messages go
        through ``convert`` as they arrive, so only the converted rows are
        held (not every raw message as well).  On an error ``into`` keeps
        the rows it had before this dump."""
        seq = self._next_seq()
        sock.send(_request(family, states, 0, NLM_F_REQUEST | NLM_F_DUMP, seq))
        start = total = len(into)
        deadline = time.monotonic() + self.timeout * 4
        try:
            # Bounded: every datagram carries at least one message, and a deadline.
            for _ in range(max_rows + 2):
                buf = sock.recv(1 << 18)
                rows, done, err = parse_dump(buf, seq)
                if err:
                    raise SockDiagError(err, f"sock_diag dump: {os.strerror(err)}")
                if len(rows):
                    into.append(convert(rows))
                    total += len(rows)
                if done:
                    return
                if total - start > max_rows or time.monotonic() > deadline:
                    raise SockDiagError(errno.E2BIG, f"sock_diag dump exceeded {max_rows} sockets or its deadline")
        except BaseException:
            into.truncate(start)
            raise

    def dump(self, families: Iterable[int] = (AF_INET, AF_INET6), states: int = ALL_STATES,
             max_rows: int = MAX_ROWS, fields: tuple[str, ...] | None = None) -> Inventory:
        """Every TCP socket of the given families and states, in every
        namespace; ``fields``: only these INV_DTYPE fields of each (each
        datagram's rows are narrowed as they come, so the whole rows are
        never all held)."""
        t0 = time.perf_counter()
        rows = Rows(INV_DTYPE if fields is None else fields_of(INV_DTYPE, fields))

        def convert(msgs: np.ndarray, ino: int) -> np.ndarray:
            inv = to_inventory(msgs, ino)
            return inv if fields is None else inv[list(fields)]  # by position, in ``fields``' order

        errors = list(self.errors)
        for ino, sock in self.socks.items():
            for fam in families:
                try:
                    self._dump_one(sock, fam, states, max_rows, lambda msgs, ino=ino: convert(msgs, ino), rows)
                except OSError as exc:
                    errors.append(f"{self.netns[ino].label} (netns {ino}) family {fam}: {exc}")
        return Inventory(rows.take(), dict(self.netns), errors, time.perf_counter() - t0)

    def cookies(self, families: Iterable[int] = (AF_INET, AF_INET6), states: int = ALL_STATES,
                max_rows: int = MAX_ROWS) -> np.ndarray:
        """The cookies of every socket :meth:`dump` would return (8 bytes a
        socket instead of a full row).  Raises OSError if any namespace's
        dump fails: a partial answer would look like closed sockets."""
        out = Rows(np.dtype(np.uint64))
        for sock in self.socks.values():
            for fam in families:
                self._dump_one(sock, fam, states, max_rows, _cookies_of, out)
        return out.take()

    # -- exact lookups ---------------------------------------------------

    def tcp_info(self, rows: np.ndarray, exact_max: int = 256, brief_below_ms: int | None = None,
                 idx: np.ndarray | None = None) -> tuple[TcpInfoTable, int]:
        """tcp_info for each row (INV_DTYPE or LOOKUP_DTYPE), in its
        namespace; with ``idx``, for ``rows[idx]`` only.

        Up to ``exact_max`` sockets of a namespace are looked up one by one
        (exact match on 4-tuple and cookie, about 50 us each); past that, one
        dump of their states with INET_DIAG_INFO is cheaper, and only the
        wanted sockets' tcp_info is decoded from it (then only their cookie,
        family and state are taken from ``rows``).  ``brief_below_ms``: see
        :class:`TcpInfoTable`.

        Returns (cookie -> TcpInfo, sockets without an answer: gone,
        timewait, or in a namespace we could not enter).
        """
        out = TcpInfoTable(brief_below_ms)
        missed = 0
        if idx is None:
            idx = np.arange(len(rows))
        netns = rows["netns"][idx]
        inos = np.unique(netns).tolist() if len(idx) else []
        for ino in inos:
            at = idx if len(inos) == 1 else idx[netns == ino]
            sock = self.socks.get(int(ino))
            if sock is None:
                missed += len(at)
                continue
            before = out.answered
            try:
                if len(at) > exact_max:
                    self._dump_info(sock, _dump_keys(rows, at), out)
                else:
                    sel = lookup_keys(rows, at)
                    for start in range(0, len(sel), _BATCH):
                        self._lookup_batch(sock, sel[start : start + _BATCH], into=out)
            except OSError as exc:  # e.g. ENOBUFS: replies were dropped
                self.errors.append(f"{self.netns[int(ino)].label} (netns {ino}) tcp_info: {exc}")
            missed += len(at) - (out.answered - before)
        return out, missed

    def lookup(self, rows: np.ndarray, exact_max: int = 256, brief_below_ms: int | None = None
               ) -> tuple[np.ndarray, TcpInfoTable, int]:
        """The kernel's current row (INV_DTYPE) and tcp_info of each socket
        ``rows`` names (INV_DTYPE or LOOKUP_DTYPE: a socket of the BPF
        table, say), in its
        namespace, without a dump: exact lookups by 4-tuple and cookie, in
        batches.  Past ``exact_max`` sockets in a namespace, one dump of
        their states with INET_DIAG_INFO is cheaper (then the cost is that
        of every socket in those states).

        ``brief_below_ms``: see :class:`TcpInfoTable`.

        Returns (rows found, cookie -> TcpInfo, sockets without an answer:
        gone, or in a namespace this session has no socket for).
        """
        found: list[np.ndarray] = []
        infos = TcpInfoTable(brief_below_ms)
        missed = 0
        for ino, sock, sel in self._by_netns(rows):
            if sock is None:
                missed += len(sel)
                continue
            got = 0
            try:
                if len(sel) > exact_max:
                    states = 0
                    for st in np.unique(sel["state"]).tolist():
                        states |= 1 << int(st)
                    part = self.dump(states=states).rows
                    part = part[(part["netns"] == ino) & np.isin(part["cookie"], sel["cookie"])]
                    self._dump_info(sock, part, infos)
                    found.append(part)
                    got = len(part)
                else:
                    for start in range(0, len(sel), _BATCH):
                        part, _, _ = self._lookup_batch(sock, sel[start : start + _BATCH], int(ino), infos)
                        found.append(part)
                        got += len(part)
            except OSError as exc:
                self.errors.append(f"{self.netns[int(ino)].label} (netns {ino}) lookup: {exc}")
            missed += len(sel) - got
        out = np.concatenate(found) if found else np.zeros(0, INV_DTYPE)
        return out, infos, missed

    def _by_netns(self, rows: np.ndarray) -> Iterator[tuple[int, socket.socket | None, np.ndarray]]:
        """Per network namespace of ``rows``: its inode, this session's
        socket there (None: not entered), and the rows in it."""
        inos = np.unique(rows["netns"]).tolist() if len(rows) else []
        for ino in inos:  # one namespace (the usual case): the rows as they are, not a copy
            yield int(ino), self.socks.get(int(ino)), rows if len(inos) == 1 else rows[rows["netns"] == ino]

    def _dump_info(self, sock: socket.socket, rows: np.ndarray, into: TcpInfoTable | None = None) -> TcpInfoTable:
        out = into if into is not None else TcpInfoTable()
        wanted = np.unique(rows["cookie"])  # sorted
        deadline = time.monotonic() + self.timeout * 4
        for fam in np.unique(rows["family"]).tolist():
            states = 0
            for st in np.unique(rows["state"][rows["family"] == fam]).tolist():
                states |= 1 << int(st)
            seq = self._next_seq()
            sock.send(_request(int(fam), states, INET_DIAG_EXT_INFO, NLM_F_REQUEST | NLM_F_DUMP, seq))
            # Bounded: a deadline, and every datagram carries at least one message.
            for _ in range(MAX_ROWS):
                _, done, err = parse_info_dump(sock.recv(1 << 18), seq, wanted, out)
                if err:
                    raise SockDiagError(err, f"sock_diag dump: {os.strerror(err)}")
                if done or time.monotonic() > deadline:
                    break
        return out

    def _lookup_batch(self, sock: socket.socket, rows: np.ndarray, netns: int = 0,
                      into: TcpInfoTable | None = None) -> tuple[np.ndarray, TcpInfoTable, int]:
        templates = {}
        wanted: dict[int, int] = {}  # seq -> cookie
        data = bytearray()
        for row in rows:
            fam = int(row["family"])
            if fam not in templates:
                templates[fam] = _request(fam, ALL_STATES, INET_DIAG_EXT_INFO, NLM_F_REQUEST, 0)
            req = bytearray(templates[fam])
            seq = self._next_seq()
            struct.pack_into("=I", req, 8, seq)
            req[_REQ_ID_OFFSET : _REQ_ID_OFFSET + 48] = _sockid(row)
            data += req
            wanted[seq] = int(row["cookie"])
        sock.send(bytes(data))
        out = into if into is not None else TcpInfoTable()
        msgs: list[np.ndarray] = []
        pending = set(wanted)
        # Each request gets exactly one reply (the socket, or an error).
        for _ in range(len(wanted) + 1):
            if not pending:
                break
            try:
                buf = sock.recv(1 << 18)
            except socket.timeout:
                break
            for mseq, (msg, info) in parse_lookup_replies(buf).items():
                if mseq in pending:
                    pending.discard(mseq)
                    if msg is not None:
                        msgs.append(msg)
                    if info is not None:
                        out.add_info(wanted[mseq], info)
        found = to_inventory(np.concatenate(msgs), netns) if msgs else np.zeros(0, INV_DTYPE)
        return found, out, len(wanted) - len(found)


_COOKIE_OFFSET = 16 + MSG_DTYPE.fields["idiag_cookie"][1]  # from the nlmsghdr
_COOKIE = struct.Struct("=II")  # cookie[0] (low), cookie[1] (high)


def parse_info_dump(buf: bytes, seq: int, wanted: set[int] | np.ndarray, into: TcpInfoTable | None = None
                    ) -> tuple[TcpInfoTable, bool, int]:
    """One datagram of a dump with INET_DIAG_INFO: tcp_info of the ``wanted``
    cookies only (the others are skipped without decoding), added to
    ``into`` (or a new table).  ``wanted``: a set, or a sorted uint64 array
    (100k cookies as a set of Python ints cost ~8 MB).  Returns (the table,
    done, errno)."""
    out = into if into is not None else TcpInfoTable()
    done = False
    err = 0
    off = 0
    n = len(buf)
    need = 16 + MSG_DTYPE.itemsize
    found: list[tuple[int, int, int]] = []  # (offset, length, cookie) of each socket message
    while off + 16 <= n:
        length, typ, mseq = _frame(buf, off, n)
        if mseq == seq:
            if typ == SOCK_DIAG_BY_FAMILY:
                if length < need:
                    raise _malformed(f"inet_diag_msg of {length} bytes", off, n)
                lo, hi = _COOKIE.unpack_from(buf, off + _COOKIE_OFFSET)
                found.append((off, length, lo | hi << 32))
            elif typ == NLMSG_DONE:
                done = True
            elif typ == NLMSG_ERROR:
                err = _nlmsg_errno(buf, off, length)
                done = True
        off += (length + 3) & ~3
    _check_end(off, n)
    if isinstance(wanted, np.ndarray):
        if not len(wanted) or not found:
            return out, done, err
        cookies = np.fromiter((c for _, _, c in found), np.uint64, len(found))
        found = [m for m, hit in zip(found, find_sorted(wanted, cookies)[1].tolist()) if hit]
    else:
        found = [m for m in found if m[2] in wanted]
    for moff, length, cookie in found:
        attrs = _attrs(buf, moff + need, moff + length)
        if INET_DIAG_INFO in attrs:
            out.add(cookie, attrs[INET_DIAG_INFO])
    return out, done, err


def parse_info_replies(buf: bytes) -> dict[int, TcpInfo | None]:
    """Replies to exact lookups in one datagram: sequence number -> tcp_info
    (None for an error reply or a socket without tcp_info, e.g. timewait)."""
    return {seq: info for seq, (_, info) in parse_lookup_replies(buf).items()}


def parse_lookup_replies(buf: bytes) -> dict[int, tuple[np.ndarray | None, TcpInfo | None]]:
    """Replies to exact lookups in one datagram: sequence number -> (the
    inet_diag_msg as a one-row MSG_DTYPE array, tcp_info); (None, None)
    for an error reply (e.g. ENOENT: gone), tcp_info None for a socket
    without one (timewait)."""
    out: dict[int, tuple[np.ndarray | None, TcpInfo | None]] = {}
    off = 0
    n = len(buf)
    while off + 16 <= n:
        length, typ, mseq = _frame(buf, off, n)
        info = msg = None
        if typ == NLMSG_ERROR:
            _nlmsg_errno(buf, off, length)
        elif typ == SOCK_DIAG_BY_FAMILY:
            if length < 16 + MSG_DTYPE.itemsize:
                raise _malformed(f"inet_diag_msg of {length} bytes", off, n)
            msg = np.frombuffer(buf, MSG_DTYPE, count=1, offset=off + 16).copy()
            attrs = _attrs(buf, off + 16 + MSG_DTYPE.itemsize, off + length)
            if INET_DIAG_INFO in attrs:
                info = decode_tcp_info(attrs[INET_DIAG_INFO])
        out[mseq] = (msg, info)
        off += (length + 3) & ~3
    _check_end(off, n)
    return out


def inventory(refs: Iterable[NetnsRef], states: int = ALL_STATES) -> Inventory:
    """One-call dump of every namespace in ``refs``."""
    with Session(refs) as s:
        return s.dump(states=states)
