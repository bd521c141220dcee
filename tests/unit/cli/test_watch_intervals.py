"""The watch loop's ticks, on a fake clock: steady ticks, and a slow consumer
(a leak scan of ~16 s at 1M sockets) skipping the ticks it missed instead of
getting one report per missed tick back to back."""

from __future__ import annotations

from pytracer.cli.watch import intervals


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def run(interval: float, duration: float | None, work: dict[int, float], limit: int = 100) -> list[tuple[int, float]]:
    """(tick, time yielded) for each tick; ``work[k]`` seconds pass while the consumer handles the k-th."""
    c = FakeClock()
    out = []
    for k, tick in enumerate(intervals(interval, duration, clock=c, sleep=c.sleep)):
        out.append((tick, c.now - 100.0))
        c.now += work.get(k, 0.01)
        if k >= limit:
            break
    return out


def test_steady_ticks_every_interval_until_duration() -> None:
    got = run(1.0, 5.0, {})
    assert [t for t, _ in got] == [1, 2, 3, 4, 5]
    assert [round(at, 6) for _, at in got] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_slow_consumer_skips_missed_ticks() -> None:
    # The second report takes 16.5 s (tick 2 at t=2 -> done at 18.5).
    got = run(1.0, None, {1: 16.5}, limit=4)
    times = [round(at, 6) for _, at in got]
    assert times[:2] == [1.0, 2.0]
    # One report at once when it is done (t=18.5), then back on the grid: not 16 back to back.
    assert times[2] == 18.5
    assert times[3] == 19.0
    assert times[4] == 20.0


def test_slow_consumer_still_ends_at_duration_with_one_last_report() -> None:
    got = run(2.0, 12.0, {0: 16.0})
    assert [round(at, 6) for _, at in got] == [2.0, 18.0]
    assert got[-1][0] == 6


def test_stopped_process_wakes_into_one_report_then_the_grid() -> None:
    """SIGSTOP for 8.3 s during the sleep before tick 2: one catch-up report on waking, not two."""
    c = FakeClock()
    stretched = []

    def sleep(s: float) -> None:
        c.sleep(s + (8.3 if len(stretched) == 1 else 0.0))
        stretched.append(s)

    got = []
    for k, _ in enumerate(intervals(1.0, None, clock=c, sleep=sleep)):
        got.append(round(c.now - 100.0, 6))
        c.now += 0.01
        if k >= 3:
            break
    assert got == [1.0, 10.3, 11.0, 12.0]
