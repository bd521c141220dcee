"""The sock_diag wire format on recorded netlink bytes, against ss from the
same moment (tests/fixtures/leaks/record.py made both).  No kernel."""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from pytracer import arrays
from pytracer.inventory import sockdiag, tcpinfo
from pytracer.kernel.tcp_states import TcpState

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "leaks"


def ss_rows() -> list[dict]:
    out = []
    for line in (FIX / "ss.txt").read_text().splitlines():
        parts = line.split()
        kv = dict(tok.split(":", 1) for tok in parts[5:] if re.match(r"^(ino|sk):", tok))
        rport = parts[4].rsplit(":", 1)[1]
        out.append({
            "state": int(TcpState.from_ss(parts[0])), "lport": int(parts[3].rsplit(":", 1)[1]),
            "rport": 0 if rport == "*" else int(rport), "inode": int(kv["ino"]), "cookie": int(kv["sk"], 16),
            "timewait": "timer:(timewait" in line, "rqueue": int(parts[1]), "wqueue": int(parts[2]),
        })
    return out


def test_wire_declarations_match_pyroute2() -> None:
    # An independent description of the same kernel structs.
    diag = pytest.importorskip("pyroute2.netlink.diag")
    nl = pytest.importorskip("pyroute2.netlink")
    assert sockdiag.INET_DIAG_MSG_FIELDS == tuple(diag.inet_diag_msg.fields)
    assert tcpinfo.TCP_INFO_FIELDS == tuple(diag.inet_diag_msg.tcp_info.fields)
    assert sockdiag.INET_DIAG_REQ_FIELDS == tuple(diag.inet_diag_req.fields)
    assert (sockdiag.NETLINK_SOCK_DIAG, sockdiag.NLM_F_DUMP, sockdiag.NLM_F_REQUEST, sockdiag.NLMSG_DONE,
            sockdiag.NLMSG_ERROR, sockdiag.SOCK_DIAG_BY_FAMILY) == (
        nl.NETLINK_SOCK_DIAG, nl.NLM_F_DUMP, nl.NLM_F_REQUEST, nl.NLMSG_DONE, nl.NLMSG_ERROR,
        diag.SOCK_DIAG_BY_FAMILY)
    # A request encodes to the same bytes as pyroute2's.
    req = diag.inet_diag_req()
    req["header"].update(type=diag.SOCK_DIAG_BY_FAMILY, flags=0x301, sequence_number=9, pid=0)
    req.update(sdiag_family=socket.AF_INET6, sdiag_protocol=socket.IPPROTO_TCP, idiag_ext=2,
               idiag_states=sockdiag.ALL_STATES, idiag_sport=0, idiag_dport=0, idiag_src=(0, 0, 0, 0),
               idiag_dst=(0, 0, 0, 0), idiag_if=0, idiag_cookie=sockdiag.NOCOOKIE)
    req.encode()
    assert bytes(sockdiag._request(socket.AF_INET6, sockdiag.ALL_STATES, 2, 0x301, 9)) == bytes(req.data)


def test_wire_layout_matches_the_kernel_headers() -> None:
    # struct inet_diag_msg is 72 bytes (include/uapi/linux/inet_diag.h).
    assert sockdiag.MSG_DTYPE.itemsize == 72
    # struct tcp_info offsets (include/uapi/linux/tcp.h).
    assert tcpinfo.TCP_INFO_OFFSETS["tcpi_rto"][0] == 8
    assert tcpinfo.TCP_INFO_OFFSETS["tcpi_last_data_sent"][0] == 44
    assert tcpinfo.TCP_INFO_OFFSETS["tcpi_last_data_recv"][0] == 52
    assert tcpinfo.TCP_INFO_OFFSETS["tcpi_last_ack_recv"][0] == 56
    assert tcpinfo.TCP_INFO_OFFSETS["tcpi_pacing_rate"][0] == 104


def test_dump_request_always_names_family_and_states() -> None:
    req = sockdiag._request(socket.AF_INET6, sockdiag.ALL_STATES, 0, 0x301, 9)
    length, typ, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    fam, proto, ext, _pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (length, typ, flags, seq) == (72, 20, 0x301, 9) == (len(req), 20, 0x301, 9)
    assert (fam, proto, ext) == (socket.AF_INET6, socket.IPPROTO_TCP, 0)
    # Every real state, 1..NEW_SYN_RECV; never the v6.9 BOUND_INACTIVE pseudo-state.
    assert states == sum(1 << s for s in range(1, 13))


def test_recorded_dump_matches_ss() -> None:
    msgs, done, err = sockdiag.parse_dump((FIX / "dump.bin").read_bytes(), 77)
    assert done and err == 0
    inv = sockdiag.to_inventory(msgs, 4242)
    got = {
        (int(r["cookie"]), int(r["state"]), int(r["lport"]), int(r["rport"]), int(r["inode"]),
         int(r["timer"]) == sockdiag.TIMER_TIMEWAIT)
        for r in inv
    }
    truth = {(r["cookie"], r["state"], r["lport"], r["rport"], r["inode"], r["timewait"]) for r in ss_rows()}
    assert len(truth) == 20 and got == truth  # 2 listeners, 18 connections
    assert set(inv["netns"].tolist()) == {4242}
    assert {bytes(r["laddr"])[:4] for r in inv} == {bytes([127, 0, 0, 1])}
    # A listener's queues: accepted-queue length and limit (the backlog).
    lst = {int(r["lport"]): (int(r["rqueue"]), int(r["wqueue"])) for r in inv if r["state"] == 10}
    assert lst == {r["lport"]: (r["rqueue"], r["wqueue"]) for r in ss_rows() if r["state"] == 10}
    assert lst[8002] == (2, 8)


def test_parse_dump_ignores_other_sequences_and_reports_errors() -> None:
    raw = (FIX / "dump.bin").read_bytes()
    msgs, done, _ = sockdiag.parse_dump(raw, 12345)
    assert len(msgs) == 0 and not done
    err = struct.pack("=IHHII", 36, 2, 0, 5, 0) + struct.pack("=i", -13) + b"\0" * 16
    msgs, done, code = sockdiag.parse_dump(err, 5)
    assert done and code == 13 and len(msgs) == 0


def test_recorded_tcp_info_matches_ss() -> None:
    meta = json.loads((FIX / "info.json").read_text())
    replies = sockdiag.parse_info_replies((FIX / "info.bin").read_bytes())
    assert list(replies) == [78]
    info = replies[78]
    assert info is not None and info.state == int(TcpState.ESTABLISHED)
    kv = dict(tok.split(":", 1) for tok in meta["ss"].split() if ":" in tok and not tok.startswith("users"))
    # ss ran a few ms after the lookup: the idle clocks agree within that.
    for ours, theirs in ((info.last_data_sent_ms, "lastsnd"), (info.last_data_recv_ms, "lastrcv"),
                         (info.last_ack_recv_ms, "lastack")):
        assert 0 <= int(kv[theirs]) - ours <= 100
    assert info.rto_us == int(kv["rto"]) * 1000
    assert (info.bytes_acked, info.bytes_received) == (int(kv["bytes_acked"]), int(kv["bytes_received"]))
    assert info.idle_ms == min(info.last_data_sent_ms, info.last_data_recv_ms)


def test_tcp_info_from_an_older_kernel_is_truncated_not_misread() -> None:
    full = bytearray(200)
    struct.pack_into("=I", full, 44, 1234)  # last_data_sent
    struct.pack_into("=I", full, 52, 99)  # last_data_recv
    old = tcpinfo.decode_tcp_info(bytes(full[:104]))  # v3.x-sized struct
    assert old is not None and old.last_data_sent_ms == 1234 and old.idle_ms == 99
    assert old.bytes_acked is None
    assert tcpinfo.decode_tcp_info(bytes(full[:40])) is None


def test_recorded_dump_with_info_decodes_only_wanted() -> None:
    raw = (FIX / "dump_info.bin").read_bytes()
    rows = {r["cookie"]: r for r in ss_rows() if r["state"] in (1, 8)}
    everything, done, err = sockdiag.parse_info_dump(raw, 79, set(rows))
    assert done and err == 0
    assert set(everything) == set(rows)  # every ESTABLISHED and CLOSE_WAIT socket, with tcp_info
    for cookie, info in everything.items():
        assert info.state == rows[cookie]["state"]
    some = sorted(rows)[:3]
    got, _, _ = sockdiag.parse_info_dump(raw, 79, set(some))
    assert set(got) == set(some) and all(got[c] == everything[c] for c in some)
    assert sockdiag.parse_info_dump(raw, 80, set(rows))[0] == {}  # another request's sequence
    # The same, wanted as a sorted array (how a session asks for many).
    arr, _, _ = sockdiag.parse_info_dump(raw, 79, np.array(some, np.uint64))
    assert set(arr) == set(some) and all(arr[c] == everything[c] for c in some)
    assert not sockdiag.parse_info_dump(raw, 79, np.zeros(0, np.uint64))[0].answered


def test_tcp_info_table_keeps_only_the_idle_time_of_busy_established_sockets() -> None:
    def info(state: int, sent_ms: int, recv_ms: int) -> bytes:
        b = bytearray(232)
        struct.pack_into("=BBB", b, 0, state, 0, 4)  # state, ca_state, retransmits
        struct.pack_into("=III", b, 44, sent_ms, 0, recv_ms)  # last_data_sent, last_ack_sent, last_data_recv
        return bytes(b)

    table = tcpinfo.TcpInfoTable(brief_below_ms=300_000)
    assert table.add(1, info(1, 5_000, 299_999))  # ESTABLISHED, idle 5 s: its idle time only
    assert table.add(2, info(1, 300_000, 400_000))  # ESTABLISHED, idle 300 s: all of it
    assert table.add(3, info(8, 10, 10))  # CLOSE_WAIT: all of it, however busy
    assert set(table) == {2, 3} and 1 not in table and len(table) == 2 and table.answered == 3
    assert table[2].retransmits == 4 and table[3].state == 8
    found, idle = table.idle_ms(np.array([3, 1, 9, 2], np.uint64))
    assert found.tolist() == [True, True, False, True] and idle[found].tolist() == [10, 5_000, 300_000]
    # A brief answer after a question is in the next answer (the sorted brief keys are rebuilt).
    assert table.add(9, info(1, 7_000, 8_000))
    found, idle = table.idle_ms(np.array([9, 1], np.uint64))
    assert found.tolist() == [True, True] and idle.tolist() == [7_000, 5_000]
    # Sorted in place between questions: out-of-order answers, one cookie twice (its first answer counts).
    for cookie, ms in ((50, 1_000), (20, 2_000), (50, 9_000), (40, 4_000)):
        assert table.add(cookie, info(1, ms, ms))
    found, idle = table.idle_ms(np.array([40, 50, 20, 9, 1], np.uint64))
    assert found.all() and idle.tolist() == [4_000, 1_000, 2_000, 7_000, 5_000]
    assert table.add(30, info(1, 3_000, 3_000)) and table.answered == 9
    found, idle = table.idle_ms(np.array([30, 50], np.uint64))
    assert idle.tolist() == [3_000, 1_000]


def test_tcp_info_table_answers_like_decode() -> None:
    full = bytearray(232)
    struct.pack_into("=BBBBB", full, 0, 8, 0, 2, 1, 3)  # state, ca_state, retransmits, probes, backoff
    struct.pack_into("=I", full, 8, 204000)  # rto
    struct.pack_into("=III", full, 44, 1234, 0, 99)  # last_data_sent, last_ack_sent, last_data_recv
    struct.pack_into("=I", full, 56, 7)  # last_ack_recv
    struct.pack_into("=Q", full, tcpinfo.TCP_INFO_OFFSETS["tcpi_bytes_received"][0], 555)
    table = tcpinfo.TcpInfoTable()
    assert table.add(11, bytes(full))
    assert table.add(12, bytes(full[:104]))  # an older kernel's struct
    assert not table.add(13, bytes(full[:40]))  # too short to answer
    assert set(table) == {11, 12} and 13 not in table and len(table) == 2
    assert table[11] == tcpinfo.decode_tcp_info(bytes(full))
    assert table[12] == tcpinfo.decode_tcp_info(bytes(full[:104]))
    assert table[12].bytes_received is None and table[11].bytes_received == 555
    found, idle = table.idle_ms(np.array([12, 13, 11], np.uint64))
    assert found.tolist() == [True, False, True] and idle[found].tolist() == [99, 99]
    # The last answer for a socket wins.
    struct.pack_into("=I", full, 52, 5)
    table.add(11, bytes(full))
    assert table[11].last_data_recv_ms == 5 and len(table) == 2


def test_rows_grow_past_their_capacity_and_truncate() -> None:
    rows = arrays.Rows(np.dtype(np.uint64), capacity=3)
    rows.append(np.arange(2, dtype=np.uint64))
    rows.append(np.arange(10, 15, dtype=np.uint64))  # past the capacity: a bigger mapping, rows kept
    assert len(rows) == 7
    rows.truncate(4)  # a failed dump's rows are dropped
    rows.append(np.array([99], np.uint64))
    out = rows.take()
    assert out.tolist() == [0, 1, 10, 11, 99] and len(rows) == 0
    out.sort()  # the rows are the caller's, writable
    assert arrays.Rows(sockdiag.INV_DTYPE).take().dtype == sockdiag.INV_DTYPE


def _retyped(raw: bytes, seq: int, typ: int | None = None) -> bytes:
    """A recorded reply with every message's sequence number set to ``seq``
    and (``typ``) its socket messages' type changed."""
    out = bytearray(raw)
    off = 0
    while off + 16 <= len(out):
        length, mtype = struct.unpack_from("=IH", out, off)
        if typ is not None and mtype == sockdiag.SOCK_DIAG_BY_FAMILY:
            struct.pack_into("=H", out, off + 4, typ)
        struct.pack_into("=I", out, off + 8, seq)
        off += (length + 3) & ~3
    return bytes(out)


def test_one_walk_request_is_a_struct_inet_diag_req_for_every_family() -> None:
    req = sockdiag._compat_request(sockdiag.ALL_STATES, 0, 0x301, 9)
    length, typ, flags, seq, _pid = struct.unpack_from("=IHHII", req)
    # nlmsghdr + struct inet_diag_req (family, src_len, dst_len, ext, sockid[48], states, dbs): 16 + 60.
    assert (length, typ, flags, seq) == (76, sockdiag.TCPDIAG_GETSOCK, 0x301, 9) and len(req) == 76
    assert struct.unpack_from("=BBBB", req, 16) == (0, 0, 0, 0)
    assert req[20:60] == bytes(40)  # ports, addresses and interface: any
    assert struct.unpack_from("=QII", req, 60) == (sockdiag.NOCOOKIE, sockdiag.ALL_STATES, 0)


def test_parse_dump_takes_the_socket_messages_of_the_request_type_only() -> None:
    raw = (FIX / "dump.bin").read_bytes()
    want, _, _ = sockdiag.parse_dump(raw, 77)
    compat = _retyped(raw, 77, sockdiag.TCPDIAG_GETSOCK)
    got, done, err = sockdiag.parse_dump(compat, 77, sockdiag.TCPDIAG_GETSOCK)
    assert done and err == 0 and len(got) == len(want) == 20
    assert got.tobytes() == want.tobytes()
    other, done, _ = sockdiag.parse_dump(compat, 77)  # not what a SOCK_DIAG_BY_FAMILY dump asked for
    assert len(other) == 0 and done


@pytest.mark.parametrize("fields", [("netns", "family", "state", "timer", "lport", "rport", "raddr"),
                                    ("cookie", "state"), ("inode", "cookie", "netns")])
def test_inventory_of_some_fields_is_the_whole_rows_narrowed(fields: tuple[str, ...]) -> None:
    msgs, _, _ = sockdiag.parse_dump((FIX / "dump.bin").read_bytes(), 77)
    whole = sockdiag.to_inventory(msgs, 4026531993)
    dtype = arrays.fields_of(sockdiag.INV_DTYPE, fields)
    some = sockdiag.to_inventory(msgs, 4026531993, dtype)
    assert some.dtype == dtype and len(some) == len(whole) == 20
    for name in fields:
        assert np.array_equal(some[name], whole[name]), name
    assert np.array_equal(some, np.array(whole[list(fields)], dtype))
    assert len(sockdiag.to_inventory(msgs[:0], 1, dtype)) == 0


def _one_by_one(buf: bytes, seq: int) -> list[bytes]:
    """The socket messages' inet_diag_msg bytes, read one message at a time."""
    out, off = [], 0
    while off + 16 <= len(buf):
        length, typ, mseq = struct.unpack_from("=IH2xI", buf, off)
        if typ == sockdiag.SOCK_DIAG_BY_FAMILY and mseq == seq:
            out.append(buf[off + 16 : off + 16 + sockdiag.MSG_DTYPE.itemsize])
        off += (length + 3) & ~3
    return out


@pytest.mark.parametrize("seed", range(5))
def test_runs_of_any_length_parse_like_one_message_at_a_time(seed: int) -> None:
    # Runs of 1..300 equal-length messages (past the first windows of the run
    # check), lengths alternating, another sequence's message inside a run.
    rng = np.random.default_rng(seed)
    parts = []
    for _run in range(40):
        extra = int(rng.integers(0, 3))
        for _ in range(int(rng.choice([1, 1, 2, 3, 17, 90, 300]))):
            body = bytearray(rng.integers(0, 256, sockdiag.MSG_DTYPE.itemsize, np.uint8).tobytes())
            body += (struct.pack("=HH", 8, 8) + bytes(4)) * extra
            mseq = 77 if rng.random() > 0.01 else 78
            parts.append(struct.pack("=IHHII", 16 + len(body), 20, 2, mseq, 0) + bytes(body))
    buf = b"".join(parts) + struct.pack("=IHHII", 20, sockdiag.NLMSG_DONE, 2, 77, 0) + bytes(4)
    msgs, done, err = sockdiag.parse_dump(buf, 77)
    want = _one_by_one(buf, 77)
    assert done and err == 0 and len(msgs) == len(want) > 40
    ref = np.frombuffer(b"".join(want), sockdiag.MSG_DTYPE)
    for name in sockdiag.MSG_DTYPE.names:
        assert np.array_equal(msgs[name], ref[name]), name
