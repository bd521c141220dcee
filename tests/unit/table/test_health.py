"""The full-table warning: while the table is full, or inserts failed in the
last RECENT_S seconds of readings; the total since start is kept apart."""

from __future__ import annotations

from pytracer.table.health import RECENT_S, FillTracker, TableFill

S = 1_000_000_000


def test_healthy_table_says_nothing() -> None:
    t = FillTracker(0)
    fill = t.update(1 * S, 10, 1024, 0)
    assert not fill.full and fill.warning() is None
    assert fill.to_json() == {"table_full": False, "insert_failed_recent": 0, "insert_failed_recent_seconds": 1.0}


def test_full_now_warns_even_without_new_failures() -> None:
    fill = TableFill(1024, 1024, 0, 0, 10.0)
    assert fill.full
    w = fill.warning()
    assert w is not None and w.startswith("WARNING: socket table full (1,024/1,024 entries)") and "--max-sockets" in w


def test_recent_failures_keep_the_warning_until_the_window_passes() -> None:
    t = FillTracker(0)
    for sec, entries, failed in [(1, 1024, 0), (2, 1024, 500), (3, 1024, 900), (4, 12, 900)]:
        fill = t.update(sec * S, entries, 1024, failed)
    # Room again at t=4, but 900 failed within the last 10 s: still a warning, with the figures.
    assert fill.full and fill.failed_recent == 900 and fill.failed_total == 900
    assert "900 socket(s) could not be tracked in the last 4 s (900 since start)" in (fill.warning() or "")
    for sec in range(5, 15):
        fill = t.update(sec * S, 12, 1024, 900)
        assert fill.full == (sec < 3 + RECENT_S), sec
    # Cleared, yet the total stays.
    assert fill.failed_total == 900 and fill.failed_recent == 0 and fill.warning() is None


def test_failures_before_the_first_reading_count_as_recent() -> None:
    # Seeding into a full table fails before watch's first report.
    fill = FillTracker(0).update(1 * S, 1024, 1024, 2000)
    assert fill.failed_recent == 2000


def test_sparse_readings_look_back_to_the_newest_one_a_window_old() -> None:
    # Scrapes 15 s apart: each covers the failures since the previous scrape.
    t = FillTracker(0)
    t.update(15 * S, 10, 1024, 0)
    fill = t.update(30 * S, 10, 1024, 7)
    assert fill.full and fill.failed_recent == 7 and fill.recent_seconds == 15.0
    fill = t.update(45 * S, 10, 1024, 7)
    assert not fill.full
