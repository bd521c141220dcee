"""Property tests of the sock_diag parsers (pytracer.inventory.sockdiag) and of
tcp_info decoding (pytracer.inventory.tcpinfo).

The independent encoder is pyroute2's own declaration of struct
inet_diag_msg and tcp_info (include/uapi/linux/inet_diag.h, tcp.h): random
rows are encoded by pyroute2 and must come back field for field.  Recorded
captures (tests/fixtures/leaks) are truncated and mutated: the parsers may
refuse them only with :class:`SockDiagError`, and never hand back a row that
was not in the capture.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytracer.inventory import sockdiag, tcpinfo

diag = pytest.importorskip("pyroute2.netlink.diag")

pytestmark = pytest.mark.fuzz

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "leaks"
DUMP = (FIX / "dump.bin").read_bytes()  # seq 77
DUMP_INFO = (FIX / "dump_info.bin").read_bytes()  # seq 79
INFO = (FIX / "info.bin").read_bytes()  # seq 78
HDR = struct.Struct("=IHHII")

u8, u16, u32 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32))
u64 = st.integers(0, (1 << 64) - 1)
TCP_INFO_NAMES = [n for n, _ in diag.inet_diag_msg.tcp_info.fields]


def _int_strategy(fmt: str) -> st.SearchStrategy[int]:
    return {"B": u8, "H": u16, "I": u32, "Q": u64}[fmt.lstrip("<>=!")[-1]]


rows = st.fixed_dictionaries({
    "idiag_family": st.sampled_from([2, 10]), "idiag_state": u8, "idiag_timer": u8, "idiag_retrans": u8,
    "idiag_sport": u16, "idiag_dport": u16,
    "idiag_src": st.tuples(u32, u32, u32, u32), "idiag_dst": st.tuples(u32, u32, u32, u32),
    "idiag_if": u32, "idiag_cookie": u64, "idiag_expires": u32, "idiag_rqueue": u32, "idiag_wqueue": u32,
    "idiag_uid": u32, "idiag_inode": u32,
})
tcp_infos = st.fixed_dictionaries({n: _int_strategy(f) for n, f in diag.inet_diag_msg.tcp_info.fields})


def encode(row: dict, seq: int, info: dict | None = None, cong: str | None = None) -> bytes:
    """One SOCK_DIAG_BY_FAMILY message, encoded by pyroute2."""
    msg = diag.inet_diag_msg()
    msg["header"].update(type=sockdiag.SOCK_DIAG_BY_FAMILY, flags=2, sequence_number=seq, pid=0)
    msg.update(row)
    attrs = []
    if cong is not None:
        attrs.append(["INET_DIAG_CONG", cong])
    if info is not None:
        attrs.append(["INET_DIAG_INFO", info])
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def done_msg(seq: int) -> bytes:
    return HDR.pack(20, sockdiag.NLMSG_DONE, 2, seq, 0) + struct.pack("=i", 0)


def expected_inventory(row: dict) -> dict:
    """What an INV_DTYPE row must hold, computed from the row by hand."""
    return {
        "cookie": row["idiag_cookie"], "family": row["idiag_family"], "state": row["idiag_state"],
        "timer": row["idiag_timer"], "retrans": row["idiag_retrans"], "lport": row["idiag_sport"],
        "rport": row["idiag_dport"], "laddr": b"".join(struct.pack(">I", w) for w in row["idiag_src"]),
        "raddr": b"".join(struct.pack(">I", w) for w in row["idiag_dst"]), "ifindex": row["idiag_if"],
        "expires_ms": row["idiag_expires"], "rqueue": row["idiag_rqueue"], "wqueue": row["idiag_wqueue"],
        "uid": row["idiag_uid"], "inode": row["idiag_inode"],
    }


def as_dict(inv_row: np.void) -> dict:
    out = {}
    for name in sockdiag.INV_DTYPE.names:
        v = inv_row[name]
        out[name] = bytes(v) if name in ("laddr", "raddr") else int(v)
    return out


def parse_or_refuse(fn, *args):  # noqa: ANN001, ANN201 - any of the parsers
    """Call a parser; its typed error is an answer, any other exception fails the test."""
    try:
        return fn(*args)
    except sockdiag.SockDiagError:
        return None


# --- round trips through an independent encoder ---------------------------------


@given(st.lists(rows, max_size=12), u32.filter(bool), st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_dump_round_trips_through_pyroute2(batch: list[dict], seq: int, with_info: bool) -> None:
    info = dict.fromkeys(TCP_INFO_NAMES, 0) if with_info else None
    buf = b"".join(encode(r, seq, info) for r in batch) + done_msg(seq)
    msgs, done, err = sockdiag.parse_dump(buf, seq)
    assert done and err == 0
    inv = sockdiag.to_inventory(msgs, 7)
    assert [as_dict(r) for r in inv] == [{**expected_inventory(r), "netns": 7} for r in batch]
    # The cookies-only path agrees with the full rows.
    assert sockdiag._cookies_of(msgs).tolist() == [r["idiag_cookie"] for r in batch]


@given(rows, tcp_infos, u32.filter(bool), st.one_of(st.none(), st.text("abcdefghijklmnopqrstuvwxyz", max_size=15)))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_tcp_info_round_trips_through_pyroute2(row: dict, info: dict, seq: int, cong: str | None) -> None:
    buf = encode(row, seq, info, cong)
    replies = sockdiag.parse_lookup_replies(buf)
    msg, got = replies[seq]
    assert msg is not None and as_dict(sockdiag.to_inventory(msg, 0)[0]) == {**expected_inventory(row), "netns": 0}
    assert got is not None
    for attr, field in tcpinfo._INFO_FIELDS:
        assert getattr(got, attr) == info[field], attr
    # The bulk path (a dump with tcp_info) answers the same, through the table.
    table, done, err = sockdiag.parse_info_dump(buf + done_msg(seq), seq, {row["idiag_cookie"]})
    assert done and err == 0 and table[row["idiag_cookie"]] == got
    # A table filled from TcpInfo objects answers the same again.
    again = tcpinfo.TcpInfoTable()
    again.add_info(row["idiag_cookie"], got)
    assert again[row["idiag_cookie"]] == got


# --- truncated and mutated captures ------------------------------------------------


def _frames(buf: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each message of a well-formed capture."""
    out, off = [], 0
    while off < len(buf):
        length = HDR.unpack_from(buf, off)[0]
        out.append((off, length))
        off += (length + 3) & ~3
    return out


def _original_rows(buf: bytes, seq: int) -> list[bytes]:
    msgs, _, _ = sockdiag.parse_dump(buf, seq)
    return [msgs[i : i + 1].tobytes() for i in range(len(msgs))]


ORIGINAL = {77: _original_rows(DUMP, 77), 79: _original_rows(DUMP_INFO, 79)}
RECORDED = {"dump.bin": (DUMP, 77), "dump_info.bin": (DUMP_INFO, 79)}
CAPTURES = st.sampled_from(sorted(RECORDED))  # by name: a failure prints the name, not 5 kB of bytes


def _is_subsequence(got: list[bytes], of: list[bytes]) -> bool:
    it = iter(of)
    return all(any(g == o for o in it) for g in got)


@given(CAPTURES, st.data())
@example("dump.bin", None)  # cut inside the first message's body: refused, not skipped
def test_truncated_capture_is_a_prefix_or_refused(capture: str, data: st.DataObject | None) -> None:
    buf, seq = RECORDED[capture]
    cut = 100 if data is None else data.draw(st.integers(0, len(buf) - 1))
    got = parse_or_refuse(sockdiag.parse_dump, buf[:cut], seq)
    frames = _frames(buf)
    on_boundary = cut in {o for o, _ in frames}
    if got is None:
        assert not on_boundary  # a cut between messages is a shorter datagram, not a bad one
        return
    msgs, done, err = got
    assert not done and err == 0  # NLMSG_DONE is the last message: a cut capture is never complete
    rows = [msgs[i : i + 1].tobytes() for i in range(len(msgs))]
    assert rows == ORIGINAL[seq][: len(rows)]
    assert on_boundary  # a cut inside a message is refused, never skipped silently


@given(CAPTURES, st.data())
def test_mutated_capture_never_yields_a_row_it_did_not_hold(capture: str, data: st.DataObject) -> None:
    buf, seq = RECORDED[capture]
    frames = _frames(buf)
    off, _ = data.draw(st.sampled_from(frames))
    # Any of the header's 16 bytes: length, type, flags, sequence, port id.
    pos = off + data.draw(st.integers(0, 15))
    mutated = bytearray(buf)
    mutated[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != buf[pos]))
    got = parse_or_refuse(sockdiag.parse_dump, bytes(mutated), seq)
    if got is None:
        return
    msgs, _, _ = got
    rows = [msgs[i : i + 1].tobytes() for i in range(len(msgs))]
    assert _is_subsequence(rows, ORIGINAL[seq])
    for parser, args in ((sockdiag.parse_info_dump, (bytes(mutated), seq, set())),
                         (sockdiag.parse_lookup_replies, (bytes(mutated),))):
        parse_or_refuse(parser, *args)


NLMSG_ERROR_SHORT = HDR.pack(16, sockdiag.NLMSG_ERROR, 0, 5, 0)


@given(st.binary(max_size=600), st.one_of(st.none(), u32))
@example(NLMSG_ERROR_SHORT, 5)  # an error message without its errno
@example(NLMSG_ERROR_SHORT + done_msg(5), 5)  # ...whose errno would be read from the next message
@example(HDR.pack(24, sockdiag.SOCK_DIAG_BY_FAMILY, 0, 5, 0) + bytes(8), 5)  # a row cut to 8 bytes
@example(HDR.pack(16 + 72 + 8, sockdiag.SOCK_DIAG_BY_FAMILY, 0, 5, 0) + bytes(72) + struct.pack("=HH", 2, 2)
         + bytes(4), 5)  # an attribute shorter than its own header
def test_random_bytes_only_typed_errors(buf: bytes, seq: int | None) -> None:
    got = parse_or_refuse(sockdiag.parse_dump, buf, seq)
    if got is not None:
        msgs, _, err = got
        assert len(msgs) <= len(buf) // (16 + sockdiag.MSG_DTYPE.itemsize)
        assert err >= 0
    parse_or_refuse(sockdiag.parse_info_dump, buf, seq or 0, set())
    replies = parse_or_refuse(sockdiag.parse_lookup_replies, buf)
    if replies is not None:
        assert len(replies) <= len(buf) // 16
    info = tcpinfo.decode_tcp_info(buf)
    table = tcpinfo.TcpInfoTable()
    if table.add(1, buf):
        assert info is not None and table[1] == info
    else:
        assert info is None


@given(st.binary(min_size=0, max_size=300), u64)
def test_tcp_info_of_any_length_decodes_or_is_none(payload: bytes, cookie: int) -> None:
    info = tcpinfo.decode_tcp_info(payload)
    if len(payload) < tcpinfo._INFO_NEED:
        assert info is None
        return
    assert info is not None
    assert info.last_data_sent_ms == struct.unpack_from("=I", payload, 44)[0]
    assert info.last_data_recv_ms == struct.unpack_from("=I", payload, 52)[0]
    assert (info.bytes_received is None) == (len(payload) < tcpinfo._INFO_KEEP)


def test_recorded_captures_still_parse_whole() -> None:
    assert len(ORIGINAL[77]) == 20 and sockdiag.parse_dump(DUMP, 77)[1]
