"""The leak rules on recorded facts and on hand-made edge cases.  No kernel.

tests/fixtures/leaks/facts.json was recorded by tests/fixtures/leaks/record.py
from a real scenario in a private network namespace: a server that accepts and
never closes (port 8001; its peers hung up), a server that never accepts (port
8002, backlog 8), and keep-alive clients, two idle and two chatty.  ss.txt is
``ss -tanpie -i`` from the same moment: the expectations below come from it,
not from the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pytracer.inventory.procs import ProcFacts
from pytracer.leaks import time_wait
from pytracer.leaks.detectors import (
    KINDS,
    Flag,
    SockFacts,
    Thresholds,
    close_wait_flag,
    combine_state_time,
    fin_wait2_flag,
    kernel_state_floor,
    last_ack_flag,
    ordered,
    socket_flags,
)
from pytracer.leaks.processes import fd_flags, growth_flags, growth_rate, update_growth
from pytracer.leaks.time_wait import time_wait_by_destination, time_wait_flags

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "leaks"


@pytest.fixture(scope="module")
def recorded() -> dict:
    d = json.loads((FIX / "facts.json").read_text())
    d["socks"] = [SockFacts.from_json(f) for f in d["facts"]]
    d["proc_facts"] = {int(pid): ProcFacts(**p) for pid, p in d["procs"].items()}
    return d


@pytest.fixture(scope="module")
def ss_rows() -> list[dict]:
    """The recorded ss lines: state, ports, owner, inode, cookie, idle clocks."""
    rows = []
    for line in (FIX / "ss.txt").read_text().splitlines():
        parts = line.split()
        users = re.findall(r'\("([^"]*)",pid=(\d+),fd=(\d+)\)', line)
        kv = dict(tok.split(":", 1) for tok in parts[5:] if re.match(r"^(ino|sk|lastsnd|lastrcv):", tok))
        rows.append({
            "state": parts[0], "recv_q": int(parts[1]), "send_q": int(parts[2]),
            "lport": int(parts[3].rsplit(":", 1)[1]), "rport": int(parts[4].rsplit(":", 1)[1] or 0)
            if parts[4].rsplit(":", 1)[1] != "*" else 0,
            "owner": (int(users[0][1]), int(users[0][2])) if users else None,
            "ino": int(kv["ino"]), "cookie": int(kv["sk"], 16),
            "idle_ms": min(int(kv["lastsnd"]), int(kv["lastrcv"])) if "lastsnd" in kv else None,
        })
    return rows


# --- recorded scenario -----------------------------------------------------------------------


def test_recorded_close_wait_held_by_fd(recorded: dict, ss_rows: list[dict]) -> None:
    flags = socket_flags(recorded["socks"], recorded["proc_facts"], Thresholds(close_wait_after=1.0, idle_after=2.0))
    got = {f.cookie: f for f in flags if f.kind == "close_wait" and f.held_by == "fd"}
    truth = {r["cookie"]: r for r in ss_rows if r["state"] == "CLOSE-WAIT" and r["owner"]}
    assert len(truth) == 3 and set(got) == set(truth)
    for cookie, r in truth.items():
        f = got[cookie]
        assert (f.pid, f.fd) == r["owner"]
        assert f.pid == recorded["pids"]["hold"]
        assert f.inode == r["ino"] and f.lport == r["lport"] == 8001 and f.rport == r["rport"]
        assert f.comm == "python" and "leaky_server.py hold" in f.cmdline
        assert f.state == "CLOSE_WAIT" and not f.at_least and f.seconds > 3.0
        assert f"fd {f.fd}" in f.detail and "close()" in f.detail


def test_recorded_close_wait_in_backlog(recorded: dict, ss_rows: list[dict]) -> None:
    flags = socket_flags(recorded["socks"], recorded["proc_facts"], Thresholds(close_wait_after=1.0))
    got = {f.cookie: f for f in flags if f.kind == "close_wait" and f.held_by == "backlog"}
    truth = {r["cookie"] for r in ss_rows if r["state"] == "CLOSE-WAIT" and r["ino"] == 0}
    listener = next(r for r in ss_rows if r["state"] == "LISTEN" and r["lport"] == 8002)
    assert len(truth) == 2 and set(got) == truth
    for f in got.values():
        assert f.pid == recorded["pids"]["noaccept"] == listener["owner"][0]
        assert f.fd is None and f.inode is None
        assert f.extra == {"listener_fd": listener["owner"][1], "backlog_queued": listener["recv_q"],
                           "backlog_limit": listener["send_q"]}
        assert "accept()" in f.detail


def test_recorded_idle_keepalive(recorded: dict, ss_rows: list[dict]) -> None:
    flags = socket_flags(recorded["socks"], recorded["proc_facts"], Thresholds(idle_after=2.0))
    got = {f.cookie: f for f in flags if f.kind == "idle_established"}
    idle = {r["cookie"] for r in ss_rows if r["state"] == "ESTAB" and r["idle_ms"] >= 2000}
    busy = {r["cookie"] for r in ss_rows if r["state"] == "ESTAB" and r["idle_ms"] < 2000}
    assert len(idle) == len(busy) == 4
    assert set(got) == idle
    idle_ports = set(recorded["conns"]["idle"])
    for f in got.values():
        assert (f.rport if f.lport == 8001 else f.lport) in idle_ports
        assert f.pid == (recorded["pids"]["hold"] if f.lport == 8001 else recorded["pids"]["keepalive"])
        assert f.idle_seconds >= 2.0 and f.held_by == "fd"


def test_recorded_thresholds_above_ages_flag_nothing(recorded: dict) -> None:
    th = Thresholds(close_wait_after=30, idle_after=30, last_ack_after=30)
    assert socket_flags(recorded["socks"], recorded["proc_facts"], th) == []


def test_recorded_fin_wait2_orphans(recorded: dict, ss_rows: list[dict]) -> None:
    socks = recorded["socks"]
    # The kernel's tcp_fin_timeout (60 s) is far away: nothing.
    assert not [f for f in socket_flags(socks, recorded["proc_facts"], Thresholds()) if "fin_wait2" in f.kind]
    flags = socket_flags(socks, recorded["proc_facts"], Thresholds(fin_wait2_after=1.0))
    got = {f.cookie for f in flags if f.kind == "fin_wait2_orphan"}
    assert got == {r["cookie"] for r in ss_rows if r["state"] == "FIN-WAIT-2"}
    assert all(f.pid is None and f.at_least for f in flags if f.kind == "fin_wait2_orphan")


def test_recorded_flags_serialize(recorded: dict) -> None:
    flags = socket_flags(recorded["socks"], recorded["proc_facts"], Thresholds(close_wait_after=1, idle_after=1))
    assert flags
    for f in flags:
        d = json.loads(json.dumps(f.to_json()))
        assert {"kind", "cookie", "pid", "comm", "cmdline", "fd", "inode", "state", "seconds", "idle_seconds",
                "laddr", "lport", "raddr", "rport", "family", "cgroup", "detail", "held_by"} <= set(d)
        assert d["kind"] in KINDS and d["detail"].endswith(".")
    kinds = [f.kind for f in ordered(flags)]
    assert kinds.index("close_wait") < kinds.index("idle_established")


# --- time in state ------------------------------------------------------------------------------


def test_kernel_floor_close_wait_is_last_ack_recv() -> None:
    assert kernel_state_floor("CLOSE_WAIT", last_ack_recv_seconds=12.5) == 12.5
    assert kernel_state_floor("FIN_WAIT2", last_ack_recv_seconds=3.0) == 3.0
    assert kernel_state_floor("ESTABLISHED", last_ack_recv_seconds=3.0) is None


def test_kernel_floor_last_ack_from_backoff() -> None:
    # Base RTO 0.2 s, three retransmissions: 0.2 + 0.4 + 0.8 s have passed.
    assert kernel_state_floor("LAST_ACK", backoff=3, rto_seconds=1.6) == pytest.approx(1.4)
    assert kernel_state_floor("LAST_ACK", backoff=0, rto_seconds=0.2) is None


def test_kernel_floor_timewait_timer() -> None:
    assert kernel_state_floor("FIN_WAIT2", timer=3, expires_seconds=20.0, fin_timeout=60) == 40.0
    assert kernel_state_floor("FIN_WAIT2", timer=3, expires_seconds=20.0, fin_timeout=None) is None
    assert kernel_state_floor("TIME_WAIT", timer=3, expires_seconds=59.0) == 1.0


def test_combine_state_time() -> None:
    assert combine_state_time(5.0, 100.0, 200.0) == (5.0, True)  # exact wins
    assert combine_state_time(None, 3.0, 7.0) == (7.0, False)
    assert combine_state_time(None, 9.0, None) == (9.0, False)
    assert combine_state_time(None, None, None) == (None, False)


# --- single-socket rules --------------------------------------------------------------------------


def sock(**kw) -> SockFacts:
    base = dict(cookie=1, netns=1, family=2, state="ESTABLISHED", laddr="10.0.0.1", lport=80, raddr="10.0.0.2",
                rport=40000, inode=100, owners=[(42, 7)], state_seconds=10.0, state_exact=True)
    base.update(kw)
    return SockFacts(**base)


PROCS = {42: ProcFacts(42, comm="srv", cmdline="srv --x", cgroup="/system.slice/srv.service", open_fds=10,
                       max_fds=1024)}


def test_close_wait_threshold_boundary() -> None:
    th = Thresholds(close_wait_after=60)
    assert close_wait_flag(sock(state="CLOSE_WAIT", state_seconds=59.9), PROCS, th) is None
    f = close_wait_flag(sock(state="CLOSE_WAIT", state_seconds=60.0), PROCS, th)
    assert f is not None and (f.pid, f.fd, f.comm, f.cgroup) == (42, 7, "srv", "/system.slice/srv.service")
    assert close_wait_flag(sock(state="CLOSE_WAIT", state_seconds=None), PROCS, th) is None


def test_close_wait_shared_after_fork_names_every_holder() -> None:
    f = close_wait_flag(sock(state="CLOSE_WAIT", state_seconds=99, owners=[(50, 4), (42, 7)]), PROCS, Thresholds())
    assert (f.pid, f.fd) == (42, 7) and f.extra["also_held_by"] == [{"pid": 50, "fd": 4}]


def test_close_wait_file_without_visible_holder() -> None:
    f = close_wait_flag(sock(state="CLOSE_WAIT", state_seconds=99, owners=[]), PROCS, Thresholds())
    assert f.held_by == "fd" and f.pid is None and "no visible process" in f.detail


def test_idle_needs_tcp_info() -> None:
    th = Thresholds(idle_after=300)
    assert idle_flag_of(sock(idle_seconds=None), th) is None
    assert idle_flag_of(sock(idle_seconds=299.0), th) is None
    f = idle_flag_of(sock(idle_seconds=301.0, state_seconds=400), th)
    assert f.kind == "idle_established" and f.idle_seconds == 301.0 and f.seconds == 400


def idle_flag_of(s: SockFacts, th: Thresholds) -> Flag | None:
    flags = socket_flags([s], PROCS, th)
    return flags[0] if flags else None


def test_fin_wait2_held_by_fd_is_stuck_not_orphan() -> None:
    th = Thresholds()
    assert fin_wait2_flag(sock(state="FIN_WAIT2", state_seconds=59, fin_timeout=60), PROCS, th) is None
    f = fin_wait2_flag(sock(state="FIN_WAIT2", state_seconds=61, fin_timeout=60), PROCS, th)
    assert f.kind == "fin_wait2_stuck" and f.fd == 7
    f = fin_wait2_flag(sock(state="FIN_WAIT2", state_seconds=61, fin_timeout=60, owners=[], inode=0), PROCS, th)
    assert f.kind == "fin_wait2_orphan" and f.pid is None


def test_last_ack_stuck() -> None:
    th = Thresholds(last_ack_after=60)
    assert last_ack_flag(sock(state="LAST_ACK", state_seconds=30), PROCS, th) is None
    f = last_ack_flag(sock(state="LAST_ACK", state_seconds=75, owners=[], inode=0, backoff=6, retransmits=6),
                      PROCS, th)
    assert f.kind == "last_ack_stuck" and f.pid is None and "6 retransmissions" in f.detail


# --- process trends -------------------------------------------------------------------------------


def feed(counts: list[int], th: Thresholds, key=(7, 1000)) -> dict:
    hist: dict = {}
    for i, n in enumerate(counts):
        hist = update_growth(hist, float(i), {key: n}, th)
    return hist


def test_growth_needs_polls_without_decrease() -> None:
    th = Thresholds(growth_polls=3, growth_min=3)
    assert growth_rate(feed([1, 2, 3], th)[(7, 1000)], th) is None  # too few polls
    assert growth_rate(feed([1, 2, 3, 4], th)[(7, 1000)], th) == pytest.approx(1.0)
    assert growth_rate(feed([1, 3, 2, 5], th)[(7, 1000)], th) is None  # a decrease
    assert growth_rate(feed([4, 4, 5, 6], th)[(7, 1000)], th) is None  # rise 2 < 3
    # Only the last growth_polls + 1 samples count: 2, 4, 4, 7 over 3 s.
    assert growth_rate(feed([0, 0, 2, 4, 4, 7], th)[(7, 1000)], th) == pytest.approx(5 / 3)


def test_growth_history_drops_gone_and_quiet_processes() -> None:
    th = Thresholds()
    hist = update_growth({}, 0.0, {(1, 10): 5, (2, 20): 0}, th)
    assert set(hist) == {(1, 10)}
    hist = update_growth(hist, 1.0, {(1, 11): 6}, th)  # pid 1 reused: a new process
    assert set(hist) == {(1, 11)} and len(hist[(1, 11)]) == 1


def test_growth_flag_estimates_time_to_fd_limit() -> None:
    th = Thresholds()
    hist = feed([10, 12, 14, 16], th, key=(42, 5))
    procs = {42: ProcFacts(42, comm="leaky", open_fds=20, max_fds=64)}
    (f,) = growth_flags(hist, procs, th)
    assert f.kind == "close_wait_growth" and f.pid == 42 and f.comm == "leaky"
    assert f.extra["per_second"] == 2.0 and f.extra["seconds_to_fd_limit"] == 22.0
    assert f.extra["samples"] == [10, 12, 14, 16] and f.extra["close_wait"] == 16


def test_fd_exhaustion_ratio() -> None:
    th = Thresholds(fd_warn_ratio=0.8)
    procs = {1: ProcFacts(1, comm="a", open_fds=819, max_fds=1024), 2: ProcFacts(2, comm="b", open_fds=820,
             max_fds=1024), 3: ProcFacts(3, comm="c", open_fds=5000, max_fds=None)}
    (f,) = fd_flags(procs, th)
    assert f.pid == 2 and f.extra == {"open_fds": 820, "max_fds": 1024, "ratio": 0.8008}


# --- TIME_WAIT pressure ---------------------------------------------------------------------------

TW_DTYPE = np.dtype([("netns", "u8"), ("state", "u1"), ("family", "u1"), ("lport", "u2"), ("raddr", "u1", (16,)),
                     ("rport", "u2")])


def rows(*specs: tuple) -> np.ndarray:
    out = np.zeros(len(specs), TW_DTYPE)
    for i, (ns, state, fam, lport, raddr, rport) in enumerate(specs):
        raw = bytes(int(x) for x in raddr.split(".")) if fam == 2 else bytes.fromhex(raddr)
        out[i] = (ns, state, fam, lport, np.frombuffer(raw.ljust(16, b"\0"), np.uint8), rport)
    return out


def test_time_wait_counts_only_connects_from_here() -> None:
    r = rows(
        *[(1, 6, 2, 40000 + i, "10.0.0.9", 80) for i in range(5)],  # client side, ephemeral
        *[(1, 6, 2, 8080, "10.0.0.7", 50000 + i) for i in range(3)],  # server side of a listener
        (1, 10, 2, 8080, "0.0.0.0", 0),  # the listener
        *[(1, 6, 2, 1000 + i, "10.0.0.9", 80) for i in range(2)],  # below the ephemeral range
        *[(2, 6, 2, 40000 + i, "10.0.0.9", 80) for i in range(4)],  # another namespace
        (1, 1, 2, 40100, "10.0.0.9", 80),  # ESTABLISHED: not TIME_WAIT
    )
    dests = time_wait_by_destination(r, {1: (32768, 60999), 2: (40000, 40099)}, host_netns=1)
    assert [(d.dest, d.count, d.range_size) for d in dests] == [
        ("10.0.0.9:80", 5, 28232), ("10.0.0.9:80@netns:2", 4, 100)]


def test_time_wait_top_and_warned() -> None:
    r = rows(*[(1, 6, 2, 40000 + i, "10.0.0.1", 80) for i in range(3)],
             *[(1, 6, 2, 40000 + i, "10.0.0.2", 80) for i in range(2)],
             *[(2, 6, 2, 40000 + i, "10.0.0.3", 443) for i in range(60)])
    ranges = {1: (32768, 60999), 2: (40000, 40099)}
    top1 = time_wait_by_destination(r, ranges, 1, top=1)
    assert [(d.raddr, d.count) for d in top1] == [("10.0.0.3", 60)]
    warned = time_wait_by_destination(r, ranges, 1, top=0, warn_ratio=0.5)
    (f,) = time_wait_flags(warned, Thresholds(time_wait_warn_ratio=0.5), {2: 2})
    assert f.kind == "time_wait_pressure" and (f.raddr, f.rport, f.netns) == ("10.0.0.3", 443, 2)
    assert f.extra == {"time_wait": 60, "range_size": 100, "ratio": 0.6, "tcp_tw_reuse": 2}
    assert not time_wait_flags(warned, Thresholds(time_wait_warn_ratio=0.7))


@pytest.mark.parametrize("seed", range(6))
def test_time_wait_counts_match_a_row_by_row_count(seed: int) -> None:
    # Random mixes: one or several namespaces (one without a known port range),
    # listeners inside and outside the ephemeral range, one or many destinations.
    rng = np.random.default_rng(seed)
    n = 3000
    nss = [1] if seed % 2 else [1, 2, 3]
    dests = [("10.0.0.9", 80)] if seed % 3 == 0 else [("10.0.0.9", 80), ("10.0.0.7", 443), ("fd00::1", 80)]
    specs = []
    for _ in range(n):
        raddr, rport = dests[int(rng.integers(len(dests)))]
        fam = 10 if ":" in raddr else 2
        raw = raddr if fam == 2 else "fd" + "0" * 29 + "1"
        specs.append((int(rng.choice(nss)), int(rng.choice([6, 6, 6, 1, 8])), fam,
                      int(rng.choice([8080, 40001, int(rng.integers(1024, 65535))])), raw, rport))
    listeners = [(ns, 10, 2, port, "0.0.0.0", 0) for ns in nss for port in (8080, 40001)][: 1 + seed % 4]
    r = rows(*specs, *listeners)
    ranges = {1: (32768, 60999), 2: (40000, 40099), 3: None}
    listening = {(ns, port) for ns, _, _, port, _, _ in listeners}
    want: dict[tuple, int] = {}
    for ns, state, fam, lport, _raddr, rport in specs:
        pr = ranges.get(ns)
        if state != 6 or (ns, lport) in listening or (pr is not None and not pr[0] <= lport <= pr[1]):
            continue
        want[(ns, rport, fam)] = want.get((ns, rport, fam), 0) + 1
    got = {(d.netns, d.rport, d.family): d.count for d in time_wait_by_destination(r, ranges, 1)}
    assert got == want and sum(got.values()) > 0


def test_time_wait_ipv6_destination() -> None:
    r = rows((1, 6, 10, 40001, "fd000000000000000000000000000001", 8443))
    (d,) = time_wait_by_destination(r, {1: (32768, 60999)}, 1)
    assert d.dest == "[fd00::1]:8443" and d.family == 10


# --- thresholds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(close_wait_after=-1), dict(fd_warn_ratio=0), dict(fd_warn_ratio=1.5),
                                 dict(time_wait_warn_ratio=0), dict(growth_polls=0), dict(fin_wait2_after=-2)])
def test_thresholds_validate(bad: dict) -> None:
    with pytest.raises(ValueError):
        Thresholds(**bad).validate()
    Thresholds().validate()


def _key_bytes(netns, family, raddr, rport) -> list[bytes]:
    """Each row's destination key as bytes, which sort as the keys do."""
    return [int(a).to_bytes(8, "big") + bytes([int(f)]) + bytes(r) + int(p).to_bytes(2, "big")
            for a, f, r, p in zip(netns, family, raddr, rport)]


@pytest.mark.parametrize("collide", [False, True])
def test_time_wait_grouping_is_exact(monkeypatch: pytest.MonkeyPatch, collide: bool) -> None:
    rng = np.random.default_rng(7)
    n = 5000
    netns = rng.choice(np.array([4026531840, 4026532001], np.uint64), n)
    family = rng.choice(np.array([2, 10], np.uint8), n)
    raddr = np.zeros((n, 16), np.uint8)
    raddr[:, :4] = rng.integers(0, 3, (n, 4))
    raddr[:, 15] = rng.integers(0, 2, n)
    rport = rng.choice(np.array([80, 443, 65535], np.uint16), n)
    if collide:  # every key mixes to the same value: the check must catch it
        monkeypatch.setattr(time_wait, "_mix", lambda netns, *_: np.zeros(len(netns), np.uint64))
    first, counts = time_wait._group(netns, family, raddr, rport)
    want: dict[bytes, int] = {}
    for k in _key_bytes(netns, family, raddr, rport):
        want[k] = want.get(k, 0) + 1
    got = _key_bytes(netns[first], family[first], raddr[first], rport[first])
    assert got == sorted(want) and counts.tolist() == [want[k] for k in got]
