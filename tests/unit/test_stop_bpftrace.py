"""The oracle's stop sequence against real processes that ignore signals."""

import subprocess
import sys

import pytest

from tests.kernel.soak import stop_bpftrace


def _sleeper(ignore: str) -> subprocess.Popen:
    code = ("import signal, sys, time\n"
            f"for s in ({ignore}): signal.signal(s, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


@pytest.mark.parametrize(("ignore", "how", "rc"), [
    ("", "SIGINT", -2),
    ("signal.SIGINT,", "SIGTERM", -15),
    ("signal.SIGINT, signal.SIGTERM", "killed", -9),
])
def test_stop_escalates_only_as_far_as_needed(ignore: str, how: str, rc: int) -> None:
    p = _sleeper(ignore)
    try:
        assert stop_bpftrace(p, 2.0) == how
        assert p.returncode == rc
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_an_oracle_that_already_exited_is_not_signalled() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert stop_bpftrace(p, 2.0) == "exited" and p.returncode == 0
