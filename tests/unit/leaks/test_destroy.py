"""``tracer destroy``'s choice, refusal and re-check rules, on hand-made flags.  No kernel."""

from __future__ import annotations

import socket
from dataclasses import fields

import pytest

from pytracer.kernel.tcp_states import TcpState
from pytracer.leaks.destroy import (
    DESTROY_KINDS,
    DESTROY_STATES,
    KIND_THRESHOLDS,
    age_seconds,
    inventory_row,
    recheck,
    refusal,
    select,
)
from pytracer.leaks.detectors import KINDS, SOCKET_RULES, Flag
from pytracer.leaks.thresholds import Thresholds


def flag(kind: str, cookie: int, state: str = "CLOSE_WAIT", seconds: float = 10.0, idle: float | None = None,
         lport: int = 8080, rport: int = 40000) -> Flag:
    return Flag(kind=kind, cookie=cookie, state=state, seconds=seconds, idle_seconds=idle, laddr="10.0.0.1",
                lport=lport, raddr="10.0.0.2", rport=rport, family="ipv4", netns=4026531840)


def test_kinds_are_the_detectors_socket_kinds_with_their_thresholds() -> None:
    assert set(DESTROY_KINDS) <= set(KINDS)
    assert len(DESTROY_KINDS) == 5 and len(SOCKET_RULES) == 4  # fin_wait2_flag gives two kinds
    names = {f.name for f in fields(Thresholds)}
    assert set(KIND_THRESHOLDS.values()) <= names
    assert "LISTEN" not in DESTROY_STATES and "CLOSE_WAIT" in DESTROY_STATES and "FIN_WAIT2" in DESTROY_STATES


def test_select_kind_port_listeners_order_and_cap() -> None:
    flags = [
        flag("close_wait", 1, seconds=5),
        flag("close_wait", 2, seconds=50, rport=9999, lport=41000),  # on another port
        flag("close_wait", 3, seconds=500),
        flag("idle_established", 4, state="ESTABLISHED", idle=900),
        flag("close_wait", 5, state="LISTEN", seconds=1000),  # never, whatever a detector says
        flag("close_wait", 6, seconds=50, lport=41000, rport=8080),  # the port at the remote end counts
    ]
    p = select(flags, "close_wait", 8080, max_sockets=2)
    assert [f.cookie for f in p.targets] == [3, 6]  # oldest first, capped
    assert p.matched == 3 and p.listeners_left == 1
    assert [f.cookie for f in select(flags, "close_wait", None, 100).targets] == [3, 2, 6, 1]
    assert [f.cookie for f in select(flags, "idle_established").targets] == [4]


def test_idle_connections_are_ordered_by_idle_time() -> None:
    a = flag("idle_established", 1, state="ESTABLISHED", seconds=1000, idle=10)
    b = flag("idle_established", 2, state="ESTABLISHED", seconds=10, idle=100)
    assert age_seconds(a) == 10
    assert [f.cookie for f in select([a, b], "idle_established", max_sockets=1).targets] == [2]


@pytest.mark.parametrize(("kind", "pids", "port", "given", "host_wide", "refused"), [
    ("close_wait", (), None, False, False, True),
    ("close_wait", (), None, True, False, True),  # a threshold alone is not a filter
    ("close_wait", (), None, False, True, True),  # nor --host-wide alone
    ("close_wait", (), None, True, True, False),
    ("idle_established", (42,), None, False, False, False),
    ("fin_wait2_orphan", (), 8080, False, False, False),
    (None, (), None, False, False, True),  # --state alone
    (None, (), None, False, True, True),
    (None, (), 5432, False, False, False),
])
def test_refusal_without_a_filter(kind: str | None, pids: tuple, port: int | None, given: bool, host_wide: bool,
                                  refused: bool) -> None:
    why = refusal(kind, pids, port, given, host_wide)
    assert (why is not None) == refused
    if refused and kind:
        assert "--host-wide" in why and "--pid" in why  # says what to add
        if not given:
            assert f"--{KIND_THRESHOLDS[kind].replace('_', '-')}" in why


def test_recheck_leaves_changed_sockets_alone() -> None:
    th = Thresholds(idle_after=60)
    cw = flag("close_wait", 1)
    assert recheck(cw, "CLOSE_WAIT", None, th) is None
    assert "gone" in recheck(cw, None, None, th)
    assert "now LAST_ACK" in recheck(cw, "LAST_ACK", None, th)
    assert "listener" in recheck(cw, "LISTEN", None, th)
    idle = flag("idle_established", 2, state="ESTABLISHED", idle=120)
    assert recheck(idle, "ESTABLISHED", 61.0, th) is None
    assert "carried data" in recheck(idle, "ESTABLISHED", 0.5, th)  # busy again since the scan
    assert recheck(idle, "ESTABLISHED", None, th) is not None


def test_inventory_row_names_the_socket() -> None:
    f = flag("close_wait", 0x1234_5678_9ABC)
    row = inventory_row(f)[0]
    assert int(row["cookie"]) == 0x1234_5678_9ABC and int(row["netns"]) == 4026531840
    assert int(row["family"]) == socket.AF_INET and int(row["state"]) == TcpState.CLOSE_WAIT
    assert bytes(row["laddr"])[:4] == socket.inet_aton("10.0.0.1") and bytes(row["raddr"])[:4] == socket.inet_aton(
        "10.0.0.2")
    assert (int(row["lport"]), int(row["rport"])) == (8080, 40000)
    f6 = Flag(kind="idle_established", cookie=7, state="ESTABLISHED", laddr="::ffff:10.0.0.1", lport=1,
              raddr="fd00::2", rport=2, family="ipv6", netns=1)
    row6 = inventory_row(f6)[0]
    assert int(row6["family"]) == socket.AF_INET6
    assert bytes(row6["laddr"]) == socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    assert bytes(row6["raddr"]) == socket.inet_pton(socket.AF_INET6, "fd00::2")


def test_no_kernel_support_refuses_before_any_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from pytracer.leaks import destroy as d
    from pytracer.leaks.report import LeakReport

    monkeypatch.setattr(d, "can_act", lambda: None)
    monkeypatch.setattr(d, "probe", lambda: errno.EOPNOTSUPP)
    monkeypatch.setattr(d, "Session", lambda refs: pytest.fail("looked up a socket"))
    run = d.Run(d.Plan([flag("close_wait", 1)], 1), LeakReport())
    with pytest.raises(d.DestroyRefused, match="CONFIG_INET_DIAG_DESTROY"):
        d.end(run, Thresholds())
    assert run.outcomes == []
    monkeypatch.setattr(d, "can_act", lambda: "ending a socket needs CAP_NET_ADMIN: run as root (sudo)")
    with pytest.raises(d.DestroyRefused, match="CAP_NET_ADMIN"):
        d.end(run, Thresholds())
