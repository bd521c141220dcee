"""pytracer.leaks.gate: the verdict of a run, --fail-on parsing, flag identity.  Pure."""

import pytest

from pytracer.leaks.detectors import KINDS, Flag
from pytracer.leaks.gate import DEFAULT_FAIL_ON, Gate, parse_kinds, verdict


def test_the_commands_failure_wins_over_flags() -> None:
    assert verdict(3, {"close_wait"}, DEFAULT_FAIL_ON) == 3
    assert verdict(130, set(), DEFAULT_FAIL_ON) == 130


def test_flags_fail_only_for_fail_on_kinds() -> None:
    assert verdict(0, {"close_wait"}, DEFAULT_FAIL_ON) == 1
    assert verdict(0, {"idle_established"}, DEFAULT_FAIL_ON) == 0
    assert verdict(0, {"idle_established"}, ("idle_established",)) == 1
    assert verdict(0, {"close_wait"}, ()) == 0
    assert verdict(0, set(), KINDS) == 0


def test_parse_kinds() -> None:
    assert parse_kinds("close_wait, fd_exhaustion,close_wait") == ("close_wait", "fd_exhaustion")
    assert parse_kinds("all") == KINDS
    assert parse_kinds("none") == parse_kinds("") == ()
    with pytest.raises(ValueError, match="unknown flag kind nope"):
        parse_kinds("close_wait,nope")


def test_a_flag_seen_at_every_scan_is_one_flag_with_its_latest_age() -> None:
    g = Gate.__new__(Gate)
    g.flags, g.dropped = {}, 0
    f1 = Flag("close_wait", cookie=7, pid=10, fd=4, seconds=1.0)
    assert g.record([f1]) == [f1]
    f2 = Flag("close_wait", cookie=7, pid=10, fd=4, seconds=2.5)
    other = Flag("close_wait", cookie=8, pid=11, fd=4, seconds=1.0)
    assert g.record([f2, other]) == [other]
    assert [f.seconds for f in g.flags.values()] == [2.5, 1.0]
