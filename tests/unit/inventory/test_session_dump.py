"""Session.dump's requests and how it reads their replies, on a socket
that answers from a recorded dump (tests/fixtures/leaks/dump.bin).  No kernel."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import numpy as np
import pytest

from pytracer.inventory import session as session_mod
from pytracer.inventory import sockdiag
from pytracer.inventory.netns import NetnsInfo, parse_sockstat
from pytracer.inventory.session import Session
from pytracer.kernel.tcp_states import TcpState

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "leaks"
DUMP = (FIX / "dump.bin").read_bytes()  # 20 sockets and NLMSG_DONE, sequence 77
V4 = ("sockets: used 230\nTCP: inuse 5 orphan 0 tw 7 alloc 9 mem 1\nUDP: inuse 1 mem 0\n"
      "UDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n")
V6 = "TCP6: inuse 3\nUDP6: inuse 0\nUDPLITE6: inuse 0\nRAW6: inuse 0\nFRAG6: inuse 0 memory 0\n"


def _reply(seq: int, typ: int) -> bytes:
    out = bytearray(DUMP)
    off = 0
    while off + 16 <= len(out):
        length, mtype = struct.unpack_from("=IH", out, off)
        if mtype == sockdiag.SOCK_DIAG_BY_FAMILY:
            struct.pack_into("=H", out, off + 4, typ)
        struct.pack_into("=I", out, off + 8, seq)
        off += (length + 3) & ~3
    return bytes(out)


class RecordedSocket:
    """Answers each dump request with the recording (as the request's
    type); ``refuse_one_walk``: answers the one-walk request as a kernel
    without it would (NLMSG_ERROR EOPNOTSUPP)."""

    def __init__(self, refuse_one_walk: bool = False) -> None:
        self.refuse = refuse_one_walk
        self.requests: list[tuple[int, int]] = []  # (message type, family)
        self.pending: list[bytes] = []

    def send(self, req: bytes) -> int:
        _, typ, _, seq, _ = struct.unpack_from("=IHHII", req)
        self.requests.append((typ, req[16]))
        if typ == sockdiag.TCPDIAG_GETSOCK and self.refuse:
            self.pending.append(struct.pack("=IHHII", 36, sockdiag.NLMSG_ERROR, 0, seq, 0)
                                + struct.pack("=i", -errno.EOPNOTSUPP) + bytes(16))
        else:
            self.pending.append(_reply(seq, typ))
        return len(req)

    def recv(self, size: int) -> bytes:
        return self.pending.pop(0)


def session(**infos: NetnsInfo) -> tuple[Session, dict[int, RecordedSocket]]:
    s = Session([])
    socks = {}
    for i, info in enumerate(infos.values(), 1):
        s.netns[i] = info
        s.socks[i] = socks[i] = RecordedSocket(refuse_one_walk=info.label == "old kernel")
    return s, socks


def info(label: str, tcp_sockets: int | None, tcp6_inuse: int | None = 0) -> NetnsInfo:
    return NetnsInfo(0, label, "/nonexistent", tcp_sockets=tcp_sockets, tcp6_inuse=tcp6_inuse)


@pytest.fixture(autouse=True)
def _one_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(session_mod._one_walk, "ok", True)


def test_both_families_in_one_walk_and_namespaces_without_tcp_skipped() -> None:
    s, socks = session(a=info("busy", 12), b=info("empty", 0), c=info("unknown", None))
    inv = s.dump(states=sockdiag.ALL_STATES, fields=("cookie", "netns", "state"))
    assert socks[1].requests == [(sockdiag.TCPDIAG_GETSOCK, 0)]
    assert socks[2].requests == []  # its sockstat counted no TCP socket
    assert socks[3].requests == [(sockdiag.TCPDIAG_GETSOCK, 0)]  # not known: walked
    assert len(inv.rows) == 40 and not inv.errors
    assert np.bincount(inv.rows["netns"].astype(np.intp)).tolist() == [0, 20, 0, 20]
    assert inv.rows.dtype.names == ("cookie", "netns", "state")


def test_with_ipv6_full_sockets_only_minisockets_are_dumped_in_one_walk() -> None:
    # IPv4 and IPv6 full sockets in one walk would alternate message lengths.
    s, socks = session(a=info("dual stack", 12, tcp6_inuse=4), b=info("not known", None, tcp6_inuse=None))
    s.dump(states=sockdiag.ALL_STATES)
    per_family = [(sockdiag.SOCK_DIAG_BY_FAMILY, 2), (sockdiag.SOCK_DIAG_BY_FAMILY, 10)]
    assert socks[1].requests == socks[2].requests == per_family
    tw, nsr, lst = (1 << int(TcpState.TIME_WAIT)), (1 << int(TcpState.NEW_SYN_RECV)), (1 << int(TcpState.LISTEN))
    s.dump(states=tw | nsr | lst)
    assert socks[1].requests[2:] == socks[2].requests[2:] == [(sockdiag.TCPDIAG_GETSOCK, 0)]
    s.dump(states=tw | (1 << int(TcpState.FIN_WAIT2)))  # FIN_WAIT2 full sockets too
    assert socks[1].requests[3:] == per_family


def test_one_family_is_asked_for_on_its_own() -> None:
    s, socks = session(a=info("busy", 12))
    inv = s.dump(families=(2,), states=sockdiag.ALL_STATES)
    assert socks[1].requests == [(sockdiag.SOCK_DIAG_BY_FAMILY, 2)] and len(inv.rows) == 20


def test_a_kernel_refusing_the_one_walk_is_asked_per_family_from_then_on() -> None:
    s, socks = session(a=info("old kernel", 12))
    inv = s.dump()
    assert socks[1].requests == [(sockdiag.TCPDIAG_GETSOCK, 0), (sockdiag.SOCK_DIAG_BY_FAMILY, 2),
                                 (sockdiag.SOCK_DIAG_BY_FAMILY, 10)]
    assert len(inv.rows) == 40 and not inv.errors
    assert session_mod._one_walk["ok"] is False
    s2, socks2 = session(a=info("busy", 12))
    s2.dump()
    assert [t for t, _ in socks2[1].requests] == [sockdiag.SOCK_DIAG_BY_FAMILY] * 2


def test_sockstat_counts_hashed_and_timewait_sockets_of_both_families() -> None:
    assert parse_sockstat(V4, V6) == (5 + 7 + 3, 3)
    assert parse_sockstat(V4.replace("inuse 5", "inuse 0").replace("tw 7", "tw 0"), "TCP6: inuse 0\n") == (0, 0)
    unknown = (None, None)
    assert parse_sockstat(V4, "") == unknown  # no IPv6: not known, never skipped
    assert parse_sockstat("TCP: inuse 5 orphan 0\n", V6) == unknown  # no tw field
    assert parse_sockstat(V4.replace("inuse 5", "inuse -1"), V6) == unknown  # a per-CPU sum mid-update
    assert parse_sockstat(V4.replace("tw 7", "tw x"), V6) == unknown


@pytest.mark.parametrize("netns", [[1] * 6, [1, 2, 1, 2, 9, 1], [2, 2, 1, 1, 1, 1]],
                         ids=["one", "mixed", "asked in one"])
def test_tcp_info_asks_each_namespace_for_its_own_rows(netns: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = session(a=info("a", 5), b=info("b", 5))  # sockets for namespaces 1 and 2; none for 9
    asked: list[tuple[int, list[int]]] = []

    def dump_info(sock: object, keys: np.ndarray, out: object) -> None:
        asked.append((next(i for i, x in s.socks.items() if x is sock), keys["cookie"].tolist()))

    monkeypatch.setattr(Session, "_dump_info", lambda self, sock, keys, out: dump_info(sock, keys, out))
    rows = np.zeros(6, sockdiag.INV_DTYPE)
    rows["cookie"], rows["netns"], rows["state"], rows["family"] = np.arange(10, 16), netns, 1, 2
    idx = np.array([2, 3, 4, 5])
    _, missed = s.tcp_info(rows, exact_max=0, idx=idx)
    want: dict[int, list[int]] = {}
    for i in idx.tolist():
        want.setdefault(netns[i], []).append(10 + i)
    assert sorted(asked) == sorted((ino, c) for ino, c in want.items() if ino in s.socks)
    assert missed == len(idx)  # the stand-in answers nothing; namespace 9, with no socket, is not asked


INFO_DUMP = (FIX / "dump_info.bin").read_bytes()  # a dump with INET_DIAG_INFO, sequence 79


class InfoSocket(RecordedSocket):
    """Answers each dump request with the recording with tcp_info, in
    datagrams of ``per`` messages; ``fail``: the second datagram of the
    first walk is an NLMSG_ERROR instead."""

    def __init__(self, per: int = 4, fail: bool = False) -> None:
        super().__init__()
        self.per, self.fail, self.exts = per, fail, []

    def send(self, req: bytes) -> int:
        _, typ, _, seq, _ = struct.unpack_from("=IHHII", req)
        self.requests.append((typ, req[16]))
        self.exts.append(req[19] if typ == sockdiag.TCPDIAG_GETSOCK else req[18])  # the extensions asked for
        msgs, off = [], 0
        while off + 16 <= len(INFO_DUMP):
            length, mtype = struct.unpack_from("=IH", INFO_DUMP, off)
            msg = bytearray(INFO_DUMP[off : off + ((length + 3) & ~3)])
            if mtype == sockdiag.SOCK_DIAG_BY_FAMILY:
                struct.pack_into("=H", msg, 4, typ)
            struct.pack_into("=I", msg, 8, seq)
            msgs.append(bytes(msg))
            off += (length + 3) & ~3
        grams = [b"".join(msgs[i : i + self.per]) for i in range(0, len(msgs), self.per)]
        if self.fail and len(self.requests) == 1:
            grams[1] = struct.pack("=IHHII", 36, sockdiag.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -errno.EIO) \
                + bytes(16)
        self.pending.extend(grams)
        return len(req)


@pytest.mark.parametrize("part_rows, most", [(1, 3), (4, 6), (1024, 1024)],
                         ids=["a datagram a part", "two datagrams a part", "the walk in one part"])
def test_walk_info_hands_parts_with_the_tcp_info_of_what_is_asked(part_rows: int, most: int) -> None:
    whole, done, _ = sockdiag.parse_dump(_resequenced(INFO_DUMP, 79), 79)
    assert done and len(whole) > 4
    want = sockdiag.to_inventory(whole, 1, sockdiag.fields_of(sockdiag.INV_DTYPE, ("cookie", "netns", "state")))
    s = Session([])
    s.netns[1], s.socks[1] = info("busy", 12), InfoSocket(per=3)  # type: ignore[assignment]
    got, answered = [], 0
    for rows, info_of in s.walk_info(1 << int(TcpState.ESTABLISHED), ("cookie", "netns", "state"),
                                     part_rows=part_rows):
        assert len(rows) <= most
        got.append(rows)
        asked = np.sort(rows["cookie"][::2])
        table = info_of(asked, None)
        assert sorted(table) == asked.tolist()  # every one asked has its tcp_info, no other one
        ref = sockdiag.parse_info_dump(_resequenced(INFO_DUMP, 79), 79, asked)[0]
        assert all(table[c] == ref[c] for c in asked.tolist())
        assert info_of(np.zeros(0, np.uint64)).answered == 0
        answered += table.answered
    assert np.concatenate(got).tolist() == want.tolist()
    assert len(got) == (1 if part_rows > len(want) else -(-len(want) // most))
    assert answered == sum(len(r[::2]) for r in got)
    assert s.socks[1].exts == [sockdiag.INET_DIAG_EXT_INFO] and not s.errors  # type: ignore[attr-defined]


@pytest.mark.parametrize("part_rows, handed", [(1, 2), (1024, 0)],
                         ids=["its first datagram handed out", "its part never complete"])
def test_walk_info_notes_a_failed_walk_and_goes_on(part_rows: int, handed: int) -> None:
    s = Session([])
    s.netns[1], s.socks[1] = info("failing", 12), InfoSocket(per=2, fail=True)  # type: ignore[assignment]
    s.netns[2], s.socks[2] = info("fine", 12), InfoSocket(per=2)  # type: ignore[assignment]
    seen = {1: 0, 2: 0}
    told: list[object] = []  # each part's namespace, and each walk's end as walk_info tells it
    for rows, _ in s.walk_info(1 << int(TcpState.ESTABLISHED), ("cookie", "netns"), ended=told.append,
                               part_rows=part_rows):
        seen[int(rows["netns"][0])] += len(rows)
        told.append(int(rows["netns"][0]))
    assert seen[1] == handed and seen[2] > 2  # what the failed walk handed out before its error
    assert s.walk_errors == 1 and len(s.errors) == 1 and "failing" in s.errors[0]
    # The failed walk's end is told before the next walk's first part (its rows can be dropped first).
    first = [1] if handed else []
    assert told[:len(first) + 1] == [*first, False] and told[-1] is True
    assert told[len(first) + 1:-1] == [2] * (len(told) - len(first) - 2)


def _resequenced(buf: bytes, seq: int) -> bytes:
    out, off = bytearray(buf), 0
    while off + 16 <= len(out):
        length = struct.unpack_from("=I", out, off)[0]
        struct.pack_into("=I", out, off + 8, seq)
        off += (length + 3) & ~3
    return bytes(out)
