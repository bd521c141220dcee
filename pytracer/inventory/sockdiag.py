"""The sock_diag wire format: requests, the parsers of replies, and the
inventory's row types.

The messages are declared here as data, field lists in pyroute2's notation
(``inet_diag_req`` and ``inet_diag_msg``, mirroring
include/uapi/linux/inet_diag.h; the ``tcp_info`` an INET_DIAG_INFO attribute
carries is declared in :mod:`pytracer.inventory.tcpinfo`); requests are
encoded from them, and the numpy dtype is derived from them, so there is one
description of the wire format.  tests/unit/inventory/test_sockdiag.py checks
it field by field against pyroute2's own declarations.  pyroute2 itself is not
imported here (only by :mod:`pytracer.inventory.destroy`, to end a socket):
the whole package costs about 20 MB of memory and 0.3 s of start-up, and
its per-message objects cost 30-115 us per socket
(measured with pyroute2 0.9.7: 0.35 s for 3,000 sockets), which a
TIME_WAIT storm of 30,000 sockets turns into seconds per scan.  The
transport is a plain netlink socket (:mod:`pytracer.inventory.session`), and
its replies are parsed here in bulk (about 1 us per socket).

An inventory row (:data:`INV_DTYPE`) is one socket: its cookie (the key the
BPF side uses), state, 5-tuple, inode (0 for sockets no file refers to:
orphans and sockets still in a listener's accept queue), queue sizes (for a
listener: accept backlog length and limit), timer, and the namespace inode.

Nothing here opens a socket: bytes in, arrays out, so the parsers are tested
and fuzzed on recorded replies, without root.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import Iterable

import numpy as np

from pytracer.arrays import fields_of, find_sorted
from pytracer.inventory.tcpinfo import TcpInfo, TcpInfoTable, decode_tcp_info
from pytracer.kernel.tcp_states import TcpState

# include/uapi/linux/netlink.h, sock_diag.h
NETLINK_SOCK_DIAG = 4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
SOCK_DIAG_BY_FAMILY = 20
# The older inet_diag request (struct inet_diag_req): its dumps take no
# family, so one walk of the kernel's socket hash lists IPv4 and IPv6 alike
# (net/ipv4/inet_diag.c, inet_diag_dump_compat: sdiag_family AF_UNSPEC).
TCPDIAG_GETSOCK = 18

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

IPPROTO_TCP = socket.IPPROTO_TCP

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


# What finds a socket again by exact lookup (Session.lookup, Session.tcp_info in
# :mod:`pytracer.inventory.session`): the key columns of INV_DTYPE, packed (58 bytes).
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


def parse_dump(buf: bytes, seq: int | None = None, msg_type: int = SOCK_DIAG_BY_FAMILY
               ) -> tuple[np.ndarray, bool, int]:
    """Parse one netlink datagram of a sock_diag reply (``msg_type``: the
    type its socket messages carry, that of the request:
    SOCK_DIAG_BY_FAMILY, or TCPDIAG_GETSOCK for :func:`_compat_request`).

    Returns (rows as MSG_DTYPE, done, error): ``done`` once NLMSG_DONE is
    seen, ``error`` the (positive) errno of an NLMSG_ERROR, else 0.  A
    malformed datagram (a message overrunning it, a short inet_diag_msg or
    error message, trailing bytes) raises :class:`SockDiagError` (EBADMSG).

    A dump's messages mostly have one length (same family, same
    attributes), so runs of equal-length messages are checked and viewed
    with numpy strides at once; only where the length changes (e.g. a
    timewait socket among full ones) is a message read on its own.  A run
    is checked in windows growing fourfold, so each costs in proportion
    to its own length, not to the rest of the datagram: messages whose
    lengths alternate (IPv4 and IPv6, timewait and full sockets, in hash
    order) cost a few microseconds each.
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
        if typ == msg_type and (seq is None or mseq == seq):
            if length < need:
                raise _malformed(f"inet_diag_msg of {length} bytes", off, n)
            k = _run(buf, off, length, step, (n - off - length) // step + 1, msg_type, seq)
            # As bytes: concatenating structured views (big-endian fields) costs ~10 us a view.
            runs.append(np.ndarray((k, MSG_DTYPE.itemsize), dtype=np.uint8, buffer=buf, offset=off + 16,
                                   strides=(step, 1)))
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
    return np.concatenate(runs).view(MSG_DTYPE).reshape(-1), done, err


def _run(buf: bytes, off: int, length: int, step: int, most: int, msg_type: int, seq: int | None) -> int:
    """How many messages from ``off`` on (at most ``most``, which fit the
    datagram) are socket messages of ``length`` bytes, of ``msg_type`` and
    (unless None) ``seq``; the first one is.  The next header is read
    alone first: a message of its own costs no numpy call."""
    if most < 2:
        return 1
    nlen, ntyp, nseq = _NLMSG_LTS.unpack_from(buf, off + step)
    if nlen != length or ntyp != msg_type or (seq is not None and nseq != seq):
        return 1
    k, window = 2, 16
    # Bounded: every round adds at least one message to k, or ends.
    while k < most:
        m = min(window, most - k)
        hdr = np.ndarray((m,), dtype=_HDR_DTYPE, buffer=buf, offset=off + k * step, strides=(step,))
        good = (hdr["len"] == length) & (hdr["type"] == msg_type)
        if seq is not None:
            good &= hdr["seq"] == seq
        if not good.all():
            return k + int(np.argmin(good))
        k += m
        window *= 4
    return k


def _cookies_of(msgs: np.ndarray) -> np.ndarray:
    cookie = msgs["idiag_cookie"].astype(np.uint64)
    if sys.byteorder == "big":
        cookie = (cookie << np.uint64(32)) | (cookie >> np.uint64(32))
    return cookie


# Where each INV_DTYPE field comes from in an inet_diag_msg (cookie and netns aside).
_FROM_MSG = {
    "family": "idiag_family", "state": "idiag_state", "timer": "idiag_timer", "retrans": "idiag_retrans",
    "lport": "idiag_sport", "rport": "idiag_dport", "laddr": "idiag_src", "raddr": "idiag_dst",
    "ifindex": "idiag_if", "expires_ms": "idiag_expires", "rqueue": "idiag_rqueue", "wqueue": "idiag_wqueue",
    "uid": "idiag_uid", "inode": "idiag_inode",
}


def to_inventory(msgs: np.ndarray, netns: int, dtype: np.dtype = INV_DTYPE) -> np.ndarray:
    """MSG_DTYPE rows -> INV_DTYPE rows of one namespace; with ``dtype``
    (some of INV_DTYPE's fields, :func:`pytracer.arrays.fields_of`), only
    those fields are converted: a dump that keeps a few fields of each
    socket does not build whole rows first."""
    out = np.empty(len(msgs), dtype)  # every field is written below
    for name in out.dtype.names:
        if name == "cookie":
            # The kernel sends cookie[0] = low 32 bits, cookie[1] = high (native u32s).
            out[name] = _cookies_of(msgs)
        elif name == "netns":
            out[name] = netns
        else:
            out[name] = msgs[_FROM_MSG[name]]
    return out



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
    :meth:`pytracer.inventory.session.Session._lookup_batch` fills in for an
    exact lookup)."""
    body = struct.pack("=BBBBI", family, IPPROTO_TCP, ext, 0, states) + bytes(4 + 32 + 4) + struct.pack("=Q", NOCOOKIE)
    return bytearray(_NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body)


def _compat_request(states: int, ext: int, flags: int, seq: int) -> bytes:
    """A struct inet_diag_req (TCPDIAG_GETSOCK) dump of every TCP socket in
    ``states``, IPv4 and IPv6 in one walk of the socket hash (the kernel
    takes no family from it).  Its replies carry TCPDIAG_GETSOCK: parse
    them with ``parse_dump(..., msg_type=TCPDIAG_GETSOCK)``."""
    # family, src_len, dst_len, ext; inet_diag_sockid; states; dbs
    body = (struct.pack("=BBBB", 0, 0, 0, ext) + bytes(4 + 32 + 4) + struct.pack("=Q", NOCOOKIE)
            + struct.pack("=II", states, 0))
    return _NLMSGHDR.pack(16 + len(body), TCPDIAG_GETSOCK, flags, seq, 0) + body


def _sockid(row: np.void) -> bytes:
    """struct inet_diag_sockid for an exact lookup of an inventory row."""
    cookie = int(row["cookie"])
    return (
        struct.pack(">HH", int(row["lport"]), int(row["rport"]))
        + bytes(row["laddr"])
        + bytes(row["raddr"])
        + struct.pack("=III", int(row["ifindex"]), cookie & 0xFFFFFFFF, cookie >> 32)
    )


_COOKIE_OFFSET = 16 + MSG_DTYPE.fields["idiag_cookie"][1]  # from the nlmsghdr
_COOKIE = struct.Struct("=II")  # cookie[0] (low), cookie[1] (high)


def parse_info_dump(buf: bytes, seq: int, wanted: set[int] | np.ndarray, into: TcpInfoTable | None = None,
                    msg_type: int = SOCK_DIAG_BY_FAMILY) -> tuple[TcpInfoTable, bool, int]:
    """One datagram of a dump with INET_DIAG_INFO: tcp_info of the ``wanted``
    cookies only (the others are skipped without decoding), added to
    ``into`` (or a new table).  ``wanted``: a set, or a sorted uint64 array
    (100k cookies as a set of Python ints cost ~8 MB).  ``msg_type``: as
    for :func:`parse_dump`.  Returns (the table, done, errno)."""
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
            if typ == msg_type:
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
