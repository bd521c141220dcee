"""Shared test configuration: markers and the root requirement."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A suite started in the background of a non-interactive shell (`make test &`)
# inherits SIGINT ignored, and so would every tracer it starts: Python then
# installs no KeyboardInterrupt handler, and the tests that stop a tracer with
# SIGINT (as Ctrl-C does) would wait on one that never hears it.  A handler
# set here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: needs root and the real kernel")
    config.addinivalue_line("markers", "slow: long-running; still part of the default run")
    config.addinivalue_line("markers", "fuzz: hypothesis property tests of a parser of outside input (make fuzz)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="kernel tier needs root")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


# Property tests (hypothesis): a bounded run in every `pytest tests`, a long one in `make fuzz`
# (--hypothesis-profile=fuzz).  No deadline: the machine is shared, and a slow example is not a bug.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extra is not installed: the fuzz modules skip themselves
    pass
else:
    settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("fuzz", max_examples=5000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
