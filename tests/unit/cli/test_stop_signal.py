"""A stop signal whose raise Python drops (it landed in a weakref callback
or a __del__, where exceptions are ignored) is raised again by the next
check_stop() of a long-running loop: seen under emulation, a SIGTERM during
an import's module-lock callback left `tracer watch` running."""

from __future__ import annotations

import gc
import signal
import weakref

import pytest

from pytracer.cli import options


class Thing:
    pass


@pytest.mark.parametrize(("sig", "exc"), [(signal.SIGTERM, options.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_signal_swallowed_by_a_callback_is_raised_again(monkeypatch: pytest.MonkeyPatch, sig: int,
                                                                exc: type[BaseException]) -> None:
    monkeypatch.setattr(options, "_stopping", None)
    swallowed = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: swallowed.append(u.exc_type))
    options.check_stop()  # nothing pending: no raise
    t = Thing()
    ref = weakref.ref(t, lambda _: options._on_stop_signal(sig, None))
    del t
    gc.collect()
    assert ref() is None and swallowed == [exc]  # Python dropped the handler's own raise
    with pytest.raises(exc):
        options.check_stop()
