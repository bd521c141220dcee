"""The Scanner on recorded facts (tests/fixtures/leaks, made by record.py), no root.

The sources a scan reads are replaced by what was recorded in a private
network namespace: the sock_diag dump (dump.bin), the tcp_info dump of the
ESTABLISHED and CLOSE_WAIT sockets (dump_info.bin), and the fd tables and
process facts the recording's scan saw (facts.json), laid out as a /proc
tree.  The answers are checked against ``ss -tanpieiOH`` taken at the same
moment (ss.txt: states, cookies ``sk:``, inodes, ``users:`` pid/fd, the
clocks ``lastrcv``/``lastack`` and timewait timers) and against what the
scenario's clients reported (facts.json ``conns``), not against the
Scanner's own earlier output.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from pytracer.arrays import fields_of
from pytracer.inventory import procs, sockdiag
from pytracer.inventory.netns import NetnsInfo
from pytracer.inventory.session import Inventory
from pytracer.inventory.tcpinfo import TcpInfoTable
from pytracer.kernel import abi
from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks import incremental
from pytracer.leaks.detectors import Thresholds
from pytracer.leaks.report import LeakReport
from pytracer.leaks.scanner import TIME_WAIT_BUDGET, TIME_WAIT_EVERY_S, Scanner, budget_gap
from pytracer.table.poll import Snapshot, Totals
from pytracer.table.reads import SOCK_DTYPE

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "leaks"
RECORDED = json.loads((FIX / "facts.json").read_text())
NS = int(RECORDED["netns"])
PIDS = RECORDED["pids"]  # hold (server that never closes), noaccept (never accepts), keepalive (client)
ROWS = sockdiag.to_inventory(sockdiag.parse_dump((FIX / "dump.bin").read_bytes(), 77)[0], NS)


def ss_sockets() -> dict[int, dict[str, Any]]:
    """ss.txt by cookie: state, ports, inode, owner (pid, fd), clocks."""
    out = {}
    for line in (FIX / "ss.txt").read_text().splitlines():
        parts = line.split()
        kv = dict(tok.split(":", 1) for tok in parts[5:] if re.match(r"^(ino|sk|lastrcv|lastack):", tok))
        user = re.search(r"pid=(\d+),fd=(\d+)", line)
        timer = re.search(r"timer:\(timewait,(\d+)sec", line)
        rport = parts[4].rsplit(":", 1)[1]
        out[int(kv["sk"], 16)] = {
            "state": TcpState.from_ss(parts[0]).name, "lport": int(parts[3].rsplit(":", 1)[1]),
            "rport": 0 if rport == "*" else int(rport), "inode": int(kv["ino"]),
            "owner": (int(user[1]), int(user[2])) if user else None,
            "timewait_left_s": int(timer[1]) if timer else None,
            "lastrcv_ms": int(kv["lastrcv"]) if "lastrcv" in kv else None,
            "lastack_ms": int(kv["lastack"]) if "lastack" in kv else None,
        }
    return out


SS = ss_sockets()


def write_proc(root: Path, decoy: bool = True) -> Path:
    """A /proc tree with the recorded processes: their facts, and an fd for
    every socket the recording's fd scan saw each hold."""
    held: dict[int, dict[int, int]] = {}  # pid -> fd -> inode
    for f in RECORDED["facts"]:
        for pid, fd in f["owners"]:
            held.setdefault(pid, {})[fd] = f["inode"]
        for pid, fd in f["listener_owners"]:  # the listener on that port
            lst = ROWS[(ROWS["state"] == int(TcpState.LISTEN)) & (ROWS["lport"] == f["lport"])]
            held.setdefault(pid, {})[fd] = int(lst["inode"][0])
    for key, p in RECORDED["procs"].items():
        d = root / key
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(p["comm"] + "\n")
        (d / "cmdline").write_bytes(p["cmdline"].replace(" ", "\0").encode() + b"\0")
        (d / "cgroup").write_text(f"0::{p['cgroup']}\n")
        (d / "limits").write_text("Limit                     Soft Limit           Hard Limit           Units\n"
                                  f"Max open files            {p['max_fds']:<20} {p['max_fds']:<20} files\n")
        fields = ["S"] + [str(i) for i in range(4, 22)] + [str(p["start_ticks"])] + ["0"] * 10
        (d / "stat").write_text(f"{key} ({p['comm']}) " + " ".join(fields) + "\n")
        for fd, ino in held.get(int(key), {}).items():
            os.symlink(f"socket:[{ino}]", d / "fd" / str(fd))
    if decoy:  # a process holding some other socket must not become anyone's owner
        d = root / "9999"
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text("decoy\n")
        (d / "stat").write_text("9999 (decoy) " + " ".join(["S"] + ["1"] * 28) + "\n")
        os.symlink("socket:[14405999]", d / "fd" / "3")
    return root


class RecordedSession:
    """A sock_diag Session that answers from the recording."""

    def __init__(self, refs: list[procs.NetnsRef]) -> None:
        self.socks = {r.ino: None for r in refs}
        self.errors: list[str] = []
        self.asked: list[int] = []  # cookies tcp_info was asked for
        self.per = RecordedSession.per  # rows a "datagram" of walk_info

    per = 3

    def __enter__(self) -> RecordedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def rows(states: int, fields: tuple[str, ...] | None) -> np.ndarray:
        rows = ROWS[((1 << ROWS["state"].astype(np.int64)) & states) != 0]
        if fields is not None:
            rows = np.array(rows[list(fields)], fields_of(sockdiag.INV_DTYPE, fields))
        return rows

    def dump(self, states: int = sockdiag.ALL_STATES, fields: tuple[str, ...] | None = None) -> Inventory:
        rows = self.rows(states, fields)
        info = NetnsInfo(NS, "netns recorded", "/nonexistent", port_range=(32768, 60999), fin_timeout=60,
                         tw_reuse=2)
        return Inventory(rows=rows, netns={NS: info})

    def tcp_info(self, rows: np.ndarray, exact_max: int = 256, brief_below_ms: int | None = None,
                 idx: np.ndarray | None = None) -> tuple[TcpInfoTable, int]:
        wanted = {int(c) for c in (rows["cookie"] if idx is None else rows["cookie"][idx])}
        self.asked += sorted(wanted)
        table, done, err = sockdiag.parse_info_dump((FIX / "dump_info.bin").read_bytes(), 79, wanted,
                                                    TcpInfoTable(brief_below_ms))
        assert done and err == 0
        return table, 0

    def walk_info(self, states: int, fields: tuple[str, ...] | None = None,
                  ended: Any = None) -> Iterator[tuple[np.ndarray, Any]]:
        """As the kernel walks them, in one walk: a few rows a datagram, each with its tcp_info."""
        rows = self.rows(states, fields)
        data = (FIX / "dump_info.bin").read_bytes()

        def info_of(wanted: np.ndarray, brief_below_ms: int | None = None) -> TcpInfoTable:
            self.asked += wanted.tolist()
            return sockdiag.parse_info_dump(data, 79, wanted, TcpInfoTable(brief_below_ms))[0]

        for start in range(0, len(rows), self.per):
            yield rows[start : start + self.per].copy(), info_of
        if ended is not None:
            ended(True)


class FailingWalk(RecordedSession):
    """The ESTABLISHED sockets in two walks, as Session.walk_info makes
    them: the first (the first ``FIRST`` rows) fails after handing out
    ``handed`` datagrams (noted in ``errors``, ``ended(False)``), the
    second is read to its end (``ended(True)``)."""

    handed = 0
    FIRST = 4

    def walk_info(self, states: int, fields: tuple[str, ...] | None = None,
                  ended: Any = None) -> Iterator[tuple[np.ndarray, Any]]:
        failed = False
        for n, (rows, info_of) in enumerate(super().walk_info(states, fields)):
            first = rows[: max(0, self.FIRST - n * self.per)]
            if len(first) and n < self.handed:
                yield first, info_of
            if len(first) < len(rows):
                if not failed:  # the first walk ends here
                    failed = True
                    self.errors.append("netns recorded family 2: [Errno 5] Input/output error")
                    if ended is not None:
                        ended(False)
                yield rows[len(first) :], info_of
        if ended is not None:
            ended(True)


def scanner(tmp_path: Path, th: Thresholds, session_type: type = RecordedSession,
            **kw: Any) -> tuple[Scanner, list[RecordedSession]]:
    root = write_proc(tmp_path)
    sessions: list[RecordedSession] = []

    def session(refs: list[procs.NetnsRef]) -> RecordedSession:
        sessions.append(session_type(refs))
        return sessions[-1]

    refs = [procs.NetnsRef(NS, "/nonexistent", "netns recorded")]
    s = Scanner(None, th, proc=str(root), netns_refs=lambda scan, proc: refs, session=session, **kw)
    return s, sessions


def flags_by_cookie(rep: Any, kind: str) -> dict[int, Any]:
    return {f.cookie: f for f in rep.flags if f.kind == kind}


TH = Thresholds(close_wait_after=1.0, idle_after=2.0, last_ack_after=1.0)


def test_every_close_wait_socket_is_flagged_with_its_owner(tmp_path: Path) -> None:
    s, _ = scanner(tmp_path, TH)
    rep = s.scan()
    assert not rep.errors, rep.errors
    truth = {c: r for c, r in SS.items() if r["state"] == "CLOSE_WAIT"}
    assert len(truth) == 5
    flagged = flags_by_cookie(rep, "close_wait")
    assert set(flagged) == set(truth)  # none missed, none extra
    listeners = {r["lport"]: r["owner"] for r in SS.values() if r["state"] == "LISTEN"}
    for cookie, r in truth.items():
        f = flagged[cookie]
        assert (f.lport, f.rport) == (r["lport"], r["rport"])
        if r["inode"]:  # held by an fd: ss names the holder
            assert f.held_by == "fd" and (f.pid, f.fd) == r["owner"] and f.inode == r["inode"]
            assert f.pid == PIDS["hold"] and f.comm == "python"
        else:  # never accepted: the listener's owner
            assert f.held_by == "backlog" and (f.pid, f.extra["listener_fd"]) == listeners[r["lport"]]
            assert f.pid == PIDS["noaccept"]
    assert rep.processes[PIDS["hold"]].close_wait == 3
    assert rep.processes[PIDS["noaccept"]].close_wait_backlog == 2
    assert 9999 not in rep.processes and rep.inventory_states["CLOSE_WAIT"] == 5


def test_a_full_scan_keeps_only_the_fields_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytracer.leaks import scanner as scanner_mod

    asked: list[Any] = []
    dump = RecordedSession.dump

    def recording(self: RecordedSession, states: int = sockdiag.ALL_STATES, fields: Any = None) -> Inventory:
        asked.append(fields)
        return dump(self, states, fields)

    monkeypatch.setattr(RecordedSession, "dump", recording)
    s, _ = scanner(tmp_path, TH)
    rep = s.scan()
    assert asked == [scanner_mod.SCAN_FIELDS] and fields_of(sockdiag.INV_DTYPE, asked[0]).itemsize == 75
    assert "uid" not in asked[0] and "retrans" not in asked[0]
    # The same verdicts as from whole rows.
    monkeypatch.setattr(scanner_mod, "SCAN_FIELDS", None)
    whole, _ = scanner(tmp_path / "whole", TH)
    again = whole.scan()
    assert not rep.errors and not again.errors
    assert [f.to_json() for f in rep.flags] == [f.to_json() for f in again.flags]
    assert rep.inventory_states == again.inventory_states and rep.flags


def _verdicts(rep: Any, s: Scanner) -> tuple:
    return ([f.to_json() for f in rep.flags], rep.inventory_states,
            {pid: (p.tcp_sockets, p.close_wait, p.close_wait_backlog) for pid, p in rep.processes.items()},
            {k: rep.stats[k] for k in ("sockets", "candidates", "info_queries", "info_missed", "table_matched")},
            rep.errors, s.history.cookies.tolist(), s._inodes.tolist())


@pytest.mark.parametrize("pids", [(), ("hold",)], ids=["every process", "--pid"])
@pytest.mark.parametrize("max_facts", [20000, 6, 2], ids=["all judged", "stuck and some idle", "stuck cut"])
def test_established_judged_a_datagram_at_a_time_as_all_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  pids: tuple, max_facts: int) -> None:
    """The ESTABLISHED sockets walked one, three or all to a datagram: the
    same flags (stuck sockets judged first when too many look flagged),
    counts, history and holders."""
    got = []
    for per in (1, 3, 10_000):
        monkeypatch.setattr(RecordedSession, "per", per)
        s, _ = scanner(tmp_path / str(per), TH, max_socket_facts=max_facts, pids=[PIDS[p] for p in pids])
        rep = s.scan()
        got.append(_verdicts(rep, s))
    assert got[0] == got[1] == got[2]
    flags, _, processes, stats, errors, cookies, inodes = got[0]
    assert len(cookies) == len(inodes) and cookies == sorted(cookies)
    if max_facts == 2:
        assert {f["kind"] for f in flags} <= {"close_wait", "fin_wait2_orphan", "last_ack"} and errors
    if max_facts == 20000 and not pids:
        assert not errors and stats["sockets"] == len(SS) and sum(1 for f in flags
                                                                   if f["kind"] == "idle_established") == 4


@pytest.mark.parametrize("chunk", [8192, 2], ids=["one chunk", "chunks of 2"])
def test_a_failed_established_walk_leaves_the_scan_as_if_it_had_handed_out_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The first of two ESTABLISHED walks fails after 0, 1 or all of its
    datagrams were judged: the same report, error and history each time,
    and none of that walk's sockets in it (as a failed dump keeps none of
    its rows); the second walk's sockets all are."""
    from pytracer.leaks import facts

    monkeypatch.setattr(facts, "FACTS_CHUNK", chunk)  # held sockets also counted in the failing walk
    est_rows = RecordedSession.rows(1 << int(TcpState.ESTABLISHED), None)
    lost = set(est_rows["cookie"][: FailingWalk.FIRST].tolist())
    assert len(lost) == FailingWalk.FIRST < len(est_rows)
    idle_ports = set(RECORDED["conns"]["idle"])
    idle = {c for c, r in SS.items() if r["state"] == "ESTABLISHED" and {r["lport"], r["rport"]} & idle_ports}
    assert idle & lost and idle - lost  # each walk holds idle connections
    whole = scanner(tmp_path / "whole", TH)[0].scan()
    got = []
    for handed in (0, 1, 99):
        monkeypatch.setattr(FailingWalk, "handed", handed)
        s, _ = scanner(tmp_path / str(handed), TH, session_type=FailingWalk)
        rep = s.scan()
        got.append(_verdicts(rep, s))
        assert rep.errors == ["netns recorded family 2: [Errno 5] Input/output error"]
        assert set(flags_by_cookie(rep, "idle_established")) == idle - lost
        assert rep.stats["sockets"] == len(SS) - len(lost)
        assert rep.inventory_states["ESTABLISHED"] == len(est_rows) - len(lost)
        kept = {c for c, r in SS.items() if r["state"] not in ("TIME_WAIT", "SYN_RECV")} - lost
        assert s.history.cookies.tolist() == sorted(kept)
        for pid, p in whole.processes.items():  # what each holds, less the failed walk's (as ss names them)
            assert rep.processes[pid].tcp_sockets == p.tcp_sockets - sum(SS[c]["owner"][0] == pid for c in lost)
    assert got[0] == got[1] == got[2]


@pytest.mark.parametrize("chunk", [8192, 3], ids=["one chunk", "chunks of 3"])
def test_idle_established_are_the_clients_idle_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          chunk: int) -> None:
    from pytracer.leaks import facts

    monkeypatch.setattr(facts, "FACTS_CHUNK", chunk)
    s, sessions = scanner(tmp_path, TH)
    rep = s.scan()
    idle_ports = set(RECORDED["conns"]["idle"])  # what the client itself reported
    truth = {c for c, r in SS.items() if r["state"] == "ESTABLISHED" and {r["lport"], r["rport"]} & idle_ports}
    assert len(truth) == 4
    flagged = flags_by_cookie(rep, "idle_established")
    assert set(flagged) == truth
    for cookie in truth:
        assert (flagged[cookie].pid, flagged[cookie].fd) == SS[cookie]["owner"]
    # tcp_info was asked for every ESTABLISHED socket (no clock says they are young).
    est = {c for c, r in SS.items() if r["state"] == "ESTABLISHED"}
    assert est <= set(sessions[0].asked)


def test_state_time_without_the_table_is_a_floor_close_to_the_truth(tmp_path: Path) -> None:
    s, _ = scanner(tmp_path, TH)
    rep = s.scan()
    info, _, _ = sockdiag.parse_info_dump((FIX / "dump_info.bin").read_bytes(), 79, set(SS))
    for cookie, f in flags_by_cookie(rep, "close_wait").items():
        r = SS[cookie]
        # CLOSE_WAIT began when the peer's FIN arrived, lastrcv ago at ss
        # time; the info dump came later by the growth of lastack.
        later_s = info[cookie].last_ack_recv_ms / 1000 - r["lastack_ms"] / 1000
        truth = r["lastrcv_ms"] / 1000 + later_s
        assert f.at_least and truth - 0.25 <= f.seconds <= truth + 0.01, (cookie, f.seconds, truth)
    for cookie, f in flags_by_cookie(rep, "fin_wait2_orphan").items():
        # fin_timeout (60 s) minus the timewait timer ss shows left.
        assert abs(f.seconds - (60 - SS[cookie]["timewait_left_s"])) < 1.0


def snapshot_with(records: dict[int, dict[str, int]]) -> Snapshot:
    socks = np.zeros(len(records), SOCK_DTYPE)
    for i, rec in enumerate(records.values()):
        for k, v in rec.items():
            socks[k][i] = v
    keys = np.fromiter(records, np.uint64, len(records))
    totals = Totals(stats=np.zeros(abi.PT_STATS, np.uint64), transitions=np.zeros((16, 16), np.uint64),
                    hists=np.zeros((1, 1), np.uint64))
    return Snapshot(mono_ns=time.monotonic_ns(), wall=time.time(), totals=totals, keys=keys, socks=socks,
                    read_seconds=0.0)


def test_state_time_from_the_table_is_exact(tmp_path: Path) -> None:
    """A record the tracer saw enter CLOSE_WAIT 42 s ago (by this test's
    clock) gives exactly that, not the tcp_info floor."""
    cookie = next(c for c, r in SS.items() if r["state"] == "CLOSE_WAIT" and r["inode"])
    other = next(c for c, r in SS.items() if r["state"] == "CLOSE_WAIT" and c != cookie and r["inode"])
    t0 = time.monotonic_ns()
    snap = snapshot_with({
        cookie: {"state": int(TcpState.CLOSE_WAIT), "state_ns": t0 - 42_000_000_000, "transitions": 3,
                 "accepted": 1},
        # Seeded and untouched: only "at least" since it was put in.
        other: {"state": int(TcpState.CLOSE_WAIT), "state_ns": t0 - 10_000_000_000,
                "flags": abi.PT_F_SEEDED | abi.PT_F_BIRTH_UNKNOWN},
    })
    s, _ = scanner(tmp_path, TH)
    rep = s.scan(snap)
    elapsed = (time.monotonic_ns() - t0) / 1e9
    flagged = flags_by_cookie(rep, "close_wait")
    assert not flagged[cookie].at_least and 42.0 <= flagged[cookie].seconds <= 42.0 + elapsed
    assert flagged[other].at_least and 10.0 <= flagged[other].seconds <= 10.0 + elapsed
    assert rep.stats["table_matched"] == 2 and rep.stats["records_reaped"] == 0


def test_a_young_socket_is_not_flagged(tmp_path: Path) -> None:
    """The table says this CLOSE_WAIT socket entered its state 0.1 s ago:
    below the threshold, whatever the floors say."""
    cookie = next(c for c, r in SS.items() if r["state"] == "CLOSE_WAIT" and r["inode"])
    snap = snapshot_with({cookie: {"state": int(TcpState.CLOSE_WAIT),
                                   "state_ns": time.monotonic_ns() - 100_000_000, "transitions": 3}})
    s, _ = scanner(tmp_path, TH)
    flagged = flags_by_cookie(s.scan(snap), "close_wait")
    assert cookie not in flagged and len(flagged) == 4


@pytest.mark.parametrize("who", ["hold", "keepalive"])
def test_pid_scope(tmp_path: Path, who: str) -> None:
    s, _ = scanner(tmp_path, TH, pids=[PIDS[who]])
    rep = s.scan()
    pids = {f.pid for f in rep.flags if f.kind in ("close_wait", "idle_established")}
    assert pids == {PIDS[who]}
    assert set(rep.processes) == {PIDS[who]}


def test_history_hands_over_sorted_rows_and_keeps_the_largest_floor() -> None:
    from pytracer.leaks import facts

    rows = np.zeros(4, sockdiag.INV_DTYPE)
    rows["cookie"] = [40, 10, 30, 20]
    rows["state"] = [1, 8, 1, 1]
    frozen = rows.copy()
    frozen.flags.writeable = False
    assert facts.sort_by_cookie(frozen)["cookie"].tolist() == [10, 20, 30, 40]
    assert facts.sort_by_cookie(rows) is rows and rows["cookie"].tolist() == [10, 20, 30, 40]
    assert rows["state"].tolist() == [8, 1, 1, 1]  # every field moved with its cookie
    h = facts.History()
    hist = h.carry(rows, now=100.0)
    every = slice(None)
    assert np.isnan(facts.seen(hist, every, 100.0)).all() and np.isnan(facts.floor_now(hist, every, 100.0)).all()
    hist.put("floor_began", 0, 100.0 - 30.0)  # a kernel floor of 30 s, measured at 100
    h.store(rows, hist)
    assert h.cookies.tolist() == [10, 20, 30, 40]
    # 5 s later, in the same state: seen for 5 s, the floor grown to 35 s.
    later = h.carry(rows, now=105.0)
    assert facts.seen(later, every, 105.0).tolist() == [5.0] * 4 and facts.floor_now(later, 0, 105.0) == 35.0
    # A socket whose state changed starts afresh.
    rows["state"][0] = 9
    again = h.carry(rows, now=106.0)
    assert np.isnan(facts.seen(again, 0, 106.0)) and np.isnan(facts.floor_now(again, 0, 106.0))
    assert facts.seen(again, 1, 106.0) == 6.0
    # Unsorted rows are sorted for the history (not handed over).
    h.store(rows[::-1].copy(), facts.Carried({k: v[::-1].copy() for k, v in again.kept.items()}, again.epoch))
    assert h.cookies.tolist() == [10, 20, 30, 40]


def test_history_stored_from_pieces_as_from_the_rows_whole() -> None:
    """A full scan's pieces (the other states, then a datagram at a time)
    make the same history as its rows whole, and the order returned lines
    a column kept beside it up with the cookies."""
    from pytracer.leaks import facts

    rng = np.random.default_rng(7)
    rows = np.zeros(50, sockdiag.INV_DTYPE)
    rows["cookie"] = rng.permutation(np.arange(1000, 1050))
    rows["state"] = rng.integers(1, 11, 50)
    rows["inode"] = rows["cookie"] + 5
    whole = facts.History()
    hist = whole.carry(rows, now=100.0)
    hist.put("not_before", np.arange(0, 50, 3), 150.0)
    hist.put("floor_began", np.arange(1, 50, 4), 60.0)
    whole.store(rows, facts.Carried({k: v.copy() for k, v in hist.kept.items()}, hist.epoch))
    pieces = facts.History()
    pieces.epoch = hist.epoch
    parts: dict[str, list[np.ndarray]] = {"cookie": [], "state": [], "inode": []}
    parts.update({name: [] for name in facts.HISTORY_TIMES})
    for part in (slice(0, 7), slice(7, 8), slice(8, 30), slice(30, 50)):
        for name in ("cookie", "state", "inode"):
            parts[name].append(rows[name][part])
        for name in facts.HISTORY_TIMES:
            parts[name].append(hist.kept[name][part])
    inodes = parts.pop("inode")
    order = pieces.store_parts(parts)
    assert not parts and pieces.cookies.tolist() == whole.cookies.tolist() == sorted(rows["cookie"].tolist())
    assert (np.concatenate(inodes)[order] == pieces.cookies + 5).all()
    for name in facts.HISTORY_TIMES:
        np.testing.assert_array_equal(pieces.carry(rows, 120.0).kept[name], whole.carry(rows, 120.0).kept[name])
    assert pieces.due_rechecks(160.0).tolist() == whole.due_rechecks(160.0).tolist()
    assert facts.History().store_parts({}).tolist() == []


def test_history_keeps_times_in_four_bytes_without_losing_seconds() -> None:
    from pytracer.leaks import facts

    rows = np.zeros(3, sockdiag.INV_DTYPE)
    rows["cookie"] = [1, 2, 3]
    rows["state"] = [1, 8, 1]
    h = facts.History()
    epoch = 20_000_000.0  # 231 days of uptime: a float32 of it is 2 s coarse
    h.carry(rows, now=epoch)
    month = epoch + 30 * 86_400.0 + 0.123
    hist = h.carry(rows, now=month)
    hist.put("floor_began", 1, month - 42.0)
    hist.put("not_before", 2, month + 300.0)
    h.store(rows, hist)
    assert {a.dtype.itemsize for a in h._hist.values()} == {4}
    later = h.carry(rows, now=month + 10.0)
    # float32 from the epoch resolves 0.25 s a month on: ample for seconds-scale facts.
    assert np.allclose(facts.seen(later, slice(None), month + 10.0), 10.0, atol=0.25)
    grown = facts.floor_now(later, slice(None), month + 10.0)
    assert abs(grown[1] - 52.0) <= 0.25 and np.isnan(grown[[0, 2]]).all()
    assert abs(later.at("not_before", 2) - (month + 300.0)) <= 0.25 and later.at("not_before", 0) == -np.inf
    # A candidate scan's merge keeps the same resolution, for old and new sockets.
    more = np.zeros(2, sockdiag.INV_DTYPE)
    more["cookie"], more["state"] = [2, 9], [8, 1]
    mh = h.carry(more, now=month + 20.0)
    mh.put("floor_began", 1, month + 20.0 - 7.0)
    h.merge(more, mh)
    assert h.cookies.tolist() == [1, 2, 3, 9]
    last = h.carry(more, now=month + 21.0)
    grown = facts.floor_now(last, slice(None), month + 21.0)
    assert abs(grown[0] - 63.0) <= 0.25 and abs(grown[1] - 8.0) <= 0.25


def test_carried_history_is_kept_as_stored_and_handed_over_whole() -> None:
    from pytracer.leaks import facts

    rows = np.zeros(3, sockdiag.INV_DTYPE)
    rows["cookie"], rows["state"] = [1, 2, 3], [1, 1, 8]
    h = facts.History()
    epoch = 20_000_000.0
    h.carry(rows, now=epoch)
    now = epoch + 30 * 86_400.0 + 0.123  # a float32 offset this far out is 0.25 s coarse
    hist = h.carry(rows, now=now)
    assert {a.dtype for a in hist.kept.values()} == {np.dtype(np.float32)} and len(hist) == 3
    # A first sighting proves nothing, however coarse the offset: "put at now" reads as now.
    assert np.isnan(facts.seen(hist, slice(None), now)).all()
    assert abs(facts.seen(hist, 0, now + 5.0) - 5.0) <= 0.25
    # Never asked is due at once; a next check is due from its time on, not before.
    assert hist.due("not_before", now).all()
    hist.put("not_before", [0, 2], [now + 60.0, now])
    assert hist.due("not_before", now).tolist() == [False, True, True]
    assert hist.due("not_before", now + 60.0).all()
    # Every row kept, in cookie order: the carried arrays become the history, not a copy of them.
    h.store(rows, hist)
    assert all(h._hist[name] is hist.kept[name] for name in hist.kept)
    later = h.carry(rows, now=now + 10.0)
    assert abs(later.at("not_before", 0) - (now + 60.0)) <= 0.25 and later.at("not_before", 1) == -np.inf


def test_history_forgets_time_wait_and_request_minisockets() -> None:
    from pytracer.leaks import facts

    rows = np.zeros(5, sockdiag.INV_DTYPE)
    rows["cookie"] = [10, 20, 30, 40, 50]
    rows["state"] = [1, 6, 8, 12, 6]  # ESTABLISHED, TIME_WAIT, CLOSE_WAIT, NEW_SYN_RECV, TIME_WAIT
    h = facts.History()
    hist = h.carry(rows, now=100.0)
    kept = facts.remembered(rows)
    assert kept.tolist() == [True, False, True, False, False]
    h.store(rows, hist, kept)
    assert h.cookies.tolist() == [10, 30]
    later = h.carry(rows, now=104.0)
    # Kept sockets carry their sighting; minisockets start afresh each full scan.
    sighted = facts.seen(later, slice(None), 104.0)
    assert sighted[[0, 2]].tolist() == [4.0, 4.0] and np.isnan(sighted[[1, 3, 4]]).all()


def test_budget_gap_is_the_floor_until_the_cost_outgrows_the_budget() -> None:
    assert budget_gap(0.002, 0.001, 15.0) == 15.0
    assert budget_gap(0.05, 0.001, 15.0) == pytest.approx(50.0)
    assert budget_gap(0.05, 0.005) == pytest.approx(10.0)


def test_a_costly_time_wait_refresh_pushes_the_next_one_back(tmp_path: Path) -> None:
    """The refresh's own duration (dump and findings) sets the gap to the
    next one: TIME_WAIT_EVERY_S while it is cheap, cost / budget when not."""
    sc, _ = scanner(tmp_path, TH)

    class SlowSession(RecordedSession):
        def dump(self, *a: Any, **kw: Any) -> Inventory:
            time.sleep(0.03)
            return super().dump(*a, **kw)

    sc.session_factory = SlowSession
    sc.refs = [procs.NetnsRef(NS, "/nonexistent", "netns recorded")]
    assert not sc.time_wait_due(1000.0)  # no full scan yet: nothing to refresh from
    incremental.refresh_time_wait(sc, LeakReport(mono_ns=0, wall=0.0), 1000.0)
    assert sc.last_time_wait == 1000.0
    assert 0.03 <= sc.time_wait_cost < 1.0
    gap = sc.time_wait_cost / TIME_WAIT_BUDGET  # 30 s or more
    assert gap > TIME_WAIT_EVERY_S
    assert not sc.time_wait_due(1000.0 + TIME_WAIT_EVERY_S)
    assert not sc.time_wait_due(1000.0 + gap - 0.5)
    assert sc.time_wait_due(1000.0 + gap + 0.5)
    sc.time_wait_cost = 0.001  # cheap again: back to the floor
    assert sc.time_wait_due(1000.0 + TIME_WAIT_EVERY_S)
    sc.pids = (1,)  # TIME_WAIT has no owner: never under --pid
    assert not sc.time_wait_due(1000.0 + gap + 0.5)
