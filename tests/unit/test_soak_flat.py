"""The soak's flatness verdict (tests/kernel/soak.flat), on made-up samples."""

from __future__ import annotations

from tests.kernel.soak import flat


def series(values: list[int]) -> list[tuple[float, int]]:
    return [(float(i), v) for i, v in enumerate(values)]


def test_a_few_fds_in_use_at_a_sample_are_not_a_leak() -> None:
    assert flat(series([28] * 30 + [31] + [28] * 30), 0, transient=6)["ok"]
    assert not flat(series([28] * 30 + [31] + [28] * 30), 0)["ok"]  # without the allowance


def test_growth_is_a_leak_even_within_the_allowance() -> None:
    # One more fd every ten samples: never past 28 * 1.05 + 6, but it does not come back.
    r = flat(series([28 + i // 10 for i in range(61)]), 0, transient=6)
    assert not r["ok"] and r["settled"] == 32


def test_past_the_allowance_fails() -> None:
    assert not flat(series([28] * 30 + [40] + [28] * 30), 0, transient=6)["ok"]


def test_samples_before_after_s_are_ignored() -> None:
    assert flat(series([10, 50] + [28] * 20), 2)["ok"]
