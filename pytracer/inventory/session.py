"""sock_diag sessions: the netlink sockets of one scan, one per network
namespace, and the dumps and lookups made through them.

A :class:`Session` answers two questions:

* **What TCP sockets exist** (every state, IPv4 and IPv6, in every network
  namespace we can enter): one ``SOCK_DIAG_BY_FAMILY`` dump per family and
  namespace, always with an explicit ``family`` and ``states`` mask.  Rows come
  back as one numpy structured array
  (:data:`pytracer.inventory.sockdiag.INV_DTYPE`).
* **tcp_info for a few candidates**: exact lookups (full 4-tuple plus
  cookie, no dump) asking for ``INET_DIAG_INFO``, which gives the kernel's
  ``last_data_recv`` / ``last_data_sent`` / ``last_ack_recv`` clocks.  Only the
  sockets the detectors care about are queried.

The wire format and its parsers are :mod:`pytracer.inventory.sockdiag`, and
struct tcp_info :mod:`pytracer.inventory.tcpinfo`; this module is the I/O.
For each namespace other than ours, the session's socket is created inside it,
and that namespace's sysctls are read there
(:func:`pytracer.inventory.netns.run_in_netns`).  The sockets are closed when
the :class:`Session` ends, so no namespace is kept alive by us.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from pytracer.arrays import Rows, fields_of, is_sorted
from pytracer.format import AF_INET, AF_INET6
from pytracer.inventory.netns import NetnsInfo, _read_sysctls, own_netns, run_in_netns
from pytracer.inventory.procs import NetnsRef
from pytracer.inventory.sockdiag import (
    _REQ_ID_OFFSET,
    ALL_STATES,
    INET_DIAG_EXT_INFO,
    INV_DTYPE,
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    SOCK_DIAG_BY_FAMILY,
    TCPDIAG_GETSOCK,
    SockDiagError,
    _compat_request,
    _cookies_of,
    _dump_keys,
    _request,
    _sockid,
    lookup_keys,
    parse_dump,
    parse_info_dump,
    parse_lookup_replies,
    to_inventory,
)
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel.environment import NETNS_NOTE, say_once
from pytracer.kernel.tcp_states import TcpState

_BATCH = 32  # exact lookups per send()
MAX_ROWS = 4_000_000  # bound on one dump
BOTH = 0  # a dump's "family" for IPv4 and IPv6 in one walk (sockdiag._compat_request)
# Minisockets: their messages carry no attributes, so have one length in
# both families (full sockets' attributes differ between IPv4 and IPv6).
MINISOCKETS = (1 << int(TcpState.TIME_WAIT)) | (1 << int(TcpState.NEW_SYN_RECV))
# Whether this kernel answers the one-walk request; set to False the first
# time it refuses (then each family is dumped on its own, as before).
_one_walk = {"ok": True}
# walk_info's decoder of one part's tcp_info: (sorted cookies wanted, brief_below_ms) -> their answers.
InfoOf = Callable[..., TcpInfoTable]
# Rows per part walk_info hands out: a datagram holds ~80 sockets with
# tcp_info, and judging a part costs a few dozen numpy calls whatever its
# size, so parts of several datagrams (their raw bytes held until the next
# part, ~32 KiB each) make a full scan at 100k cheaper by most of that.
WALK_PART_ROWS = 1024


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


def _info_part(msgs: list[np.ndarray], raw: list[tuple[bytes, int, int]], ino: int, dtype: np.dtype
               ) -> tuple[np.ndarray, InfoOf]:
    """One part of :meth:`Session.walk_info`: its datagrams' socket
    messages as rows of ``dtype`` in namespace ``ino``, and the decoder of
    their tcp_info."""

    def info_of(wanted: np.ndarray, brief_below_ms: int | None = None) -> TcpInfoTable:
        out = TcpInfoTable(brief_below_ms)
        if len(wanted):  # most parts of a full scan after the first: none
            for buf, seq, msg_type in raw:
                parse_info_dump(buf, seq, wanted, out, msg_type)
        return out

    return to_inventory(msgs[0] if len(msgs) == 1 else np.concatenate(msgs), ino, dtype), info_of


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
        self.walk_errors = 0  # walks of walk_info that failed
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

    def _datagrams(self, sock: socket.socket, family: int, states: int, max_rows: int, ext: int = 0
                   ) -> Iterator[tuple[bytes, np.ndarray, int, int]]:
        """One dump (``family`` BOTH: IPv4 and IPv6 in one walk), a datagram
        at a time: (the datagram, its socket messages as MSG_DTYPE rows, the
        request's sequence number, its messages' type).  ``ext``: the
        inet_diag extensions asked for (INET_DIAG_EXT_INFO: tcp_info in
        each message).  Raises on an error reply, past ``max_rows`` or past
        its deadline."""
        seq = self._next_seq()
        if family == BOTH:
            sock.send(_compat_request(states, ext, NLM_F_REQUEST | NLM_F_DUMP, seq))
        else:
            sock.send(_request(family, states, ext, NLM_F_REQUEST | NLM_F_DUMP, seq))
        msg_type = TCPDIAG_GETSOCK if family == BOTH else SOCK_DIAG_BY_FAMILY
        total = 0
        deadline = time.monotonic() + self.timeout * 4
        # Bounded: every datagram carries at least one message, and a deadline.
        for _ in range(max_rows + 2):
            buf = sock.recv(1 << 18)
            rows, done, err = parse_dump(buf, seq, msg_type)
            if err:
                raise SockDiagError(err, f"sock_diag dump: {os.strerror(err)}")
            if len(rows):
                yield buf, rows, seq, msg_type
                total += len(rows)
            if done:
                return
            if total > max_rows or time.monotonic() > deadline:
                raise SockDiagError(errno.E2BIG, f"sock_diag dump exceeded {max_rows} sockets or its deadline")

    def _dump_one(self, sock: socket.socket, family: int, states: int, max_rows: int,
                  convert: Callable[[np.ndarray], np.ndarray], into: Rows) -> None:
        """One dump (``family`` BOTH: IPv4 and IPv6 in one walk), appended
        to ``into``; each datagram's messages go
        through ``convert`` as they arrive, so only the converted rows are
        held (not every raw message as well).  On an error ``into`` keeps
        the rows it had before this dump."""
        start = len(into)
        try:
            for _, rows, _, _ in self._datagrams(sock, family, states, max_rows):
                into.append(convert(rows))
        except BaseException:
            into.truncate(start)
            raise

    def walk_info(self, states: int, fields: tuple[str, ...] | None = None,
                  families: Iterable[int] = (AF_INET, AF_INET6), max_rows: int = MAX_ROWS,
                  ended: Callable[[bool], None] | None = None, part_rows: int = WALK_PART_ROWS
                  ) -> Iterator[tuple[np.ndarray, InfoOf]]:
        """Every TCP socket in ``states``, in every namespace, with tcp_info
        (INET_DIAG_INFO) in the same walk, a part at a time: (its rows, as
        :meth:`dump` makes them, ``fields`` of INV_DTYPE only; a function
        that decodes the tcp_info of the cookies asked for, a sorted uint64
        array, into a :class:`TcpInfoTable` with the ``brief_below_ms``
        given).  A part is the datagrams read until it holds ``part_rows``
        rows, or the walk's end; nothing of it is kept once the next is
        asked for, so a caller that judges each as it comes never holds
        every socket's row or answer.

        A failed walk (a namespace, a family) is appended to
        :attr:`errors` (``walk_errors`` counts them), and the others go on;
        the parts it yielded before failing have been handed out.  So
        ``ended`` is called as each walk ends, before the next one's first
        part: True when it was read to its end, False when it failed (what
        the caller made of its parts is then to be dropped)."""
        dtype = INV_DTYPE if fields is None else fields_of(INV_DTYPE, fields)
        fams = list(families)
        for ino, sock in list(self.socks.items()):
            if self.netns[ino].tcp_sockets == 0:
                continue  # nothing to list there
            both = _one_walk["ok"] and sorted(fams) == sorted((AF_INET, AF_INET6))
            walks = [BOTH] if both and _one_walk_fits(states, self.netns[ino]) else fams
            for fam in walks:
                got = 0
                try:
                    msgs: list[np.ndarray] = []  # the part's socket messages, converted once it is whole
                    raw: list[tuple[bytes, int, int]] = []  # (datagram, seq, msg_type) of each
                    held = 0
                    for buf, part, seq, msg_type in self._datagrams(sock, fam, states, max_rows, INET_DIAG_EXT_INFO):
                        got += 1
                        msgs.append(part)
                        raw.append((buf, seq, msg_type))
                        held += len(part)
                        if held >= part_rows:
                            yield _info_part(msgs, raw, ino, dtype)
                            msgs, raw, held = [], [], 0
                    if msgs:
                        yield _info_part(msgs, raw, ino, dtype)
                except OSError as exc:
                    if fam == BOTH and not got and _refused(exc):
                        _one_walk["ok"] = False  # an older request this kernel does not serve: one per family
                        walks.extend(fams)
                        continue
                    if ended is not None:
                        ended(False)
                    label = "families 2 and 10" if fam == BOTH else f"family {fam}"
                    self.errors.append(f"{self.netns[ino].label} (netns {ino}) {label}: {exc}")
                    self.walk_errors += 1
                else:
                    if ended is not None:
                        ended(True)

    def dump(self, families: Iterable[int] = (AF_INET, AF_INET6), states: int = ALL_STATES,
             max_rows: int = MAX_ROWS, fields: tuple[str, ...] | None = None) -> Inventory:
        """Every TCP socket of the given families and states, in every
        namespace; ``fields``: only these INV_DTYPE fields of each (each
        datagram's rows are narrowed as they come, so the whole rows are
        never all held).

        What the kernel does is most of a dump's cost: each request walks
        the whole TCP hash table (every bucket, every socket of every
        namespace), so both families are asked for in one request (one
        walk instead of two) where the kernel allows it and the messages
        keep the lengths a one-family dump has (only minisockets asked
        for, or no IPv6 full socket: :func:`_one_walk_fits`), and a
        namespace whose sockstat counted no TCP socket when the session
        entered it (:attr:`NetnsInfo.tcp_sockets`) is not walked at all."""
        t0 = time.perf_counter()
        dtype = INV_DTYPE if fields is None else fields_of(INV_DTYPE, fields)
        rows = Rows(dtype)
        fams = list(families)
        errors = list(self.errors)
        for ino, sock in self.socks.items():
            if self.netns[ino].tcp_sockets == 0:
                continue  # nothing to list there

            def convert(msgs: np.ndarray, ino: int = ino) -> np.ndarray:
                return to_inventory(msgs, ino, dtype)

            both = _one_walk["ok"] and sorted(fams) == sorted((AF_INET, AF_INET6))
            walks = [BOTH] if both and _one_walk_fits(states, self.netns[ino]) else fams
            for fam in walks:
                try:
                    self._dump_one(sock, fam, states, max_rows, convert, rows)
                except OSError as exc:
                    if fam == BOTH and _refused(exc):
                        _one_walk["ok"] = False  # an older request this kernel does not serve: one per family
                        walks.extend(fams)
                        continue
                    label = "families 2 and 10" if fam == BOTH else f"family {fam}"
                    errors.append(f"{self.netns[ino].label} (netns {ino}) {label}: {exc}")
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
        column = rows["netns"]
        netns: np.ndarray | None = None  # one namespace: every row, and no copy of their namespaces
        if not len(idx):
            inos = []
        elif column.min() == column.max():  # every row's (the usual case): no copy to find it
            inos = [int(column[0])]
        else:
            netns = column[idx]
            inos = np.unique(netns).tolist()
            if len(inos) == 1:
                netns = None
        for ino in inos:
            at = idx if netns is None else idx[netns == ino]
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
        wanted = rows["cookie"] if is_sorted(rows["cookie"]) else np.unique(rows["cookie"])  # sorted
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


def _one_walk_fits(states: int, info: NetnsInfo) -> bool:
    """Whether one walk for both families keeps the messages' lengths as a
    one-family dump has them: IPv4 and IPv6 full sockets in hash order
    would alternate lengths (parse_dump reads each such message alone,
    ~2 us, against ~0.1 us in a run), which costs more than the walk saved.
    So: only minisockets (and listeners, which come first, from their own
    table) asked for, or no IPv6 full socket in the namespace."""
    return not (states & ~(MINISOCKETS | (1 << int(TcpState.LISTEN)))) or info.tcp6_inuse == 0


def _refused(exc: OSError) -> bool:
    """Whether a failed one-walk dump means the kernel does not serve that
    request (rather than a dump that failed on its way)."""
    return exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)


def inventory(refs: Iterable[NetnsRef], states: int = ALL_STATES) -> Inventory:
    """One-call dump of every namespace in ``refs``."""
    with Session(refs) as s:
        return s.dump(states=states)
