"""The CLI's signal plumbing (pure logic)."""

from __future__ import annotations

import pytest

from pytracer.cli.options import Terminated, run


def test_sigterm_passes_through_best_effort_code() -> None:
    """SIGTERM raises Terminated, which code that catches Exception (the
    leak scan, seeding) must not swallow, and run() turns into exit 0."""

    @run
    def busy() -> None:
        try:
            raise Terminated()
        except Exception:  # noqa: BLE001 - what best-effort code does
            pytest.fail("Terminated was caught as an ordinary Exception")

    with pytest.raises(SystemExit) as exc:
        busy()
    assert exc.value.code == 0
