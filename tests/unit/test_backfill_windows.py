"""The backfill's StudyDate windows: planned by calendar year, split in halves, skipped when done; a full day
halved by StudyTime ranges."""

from __future__ import annotations

from datetime import date

import pytest

from pacs_bridge.backfill.windows import (
    WHOLE_DAY,
    TimeRange,
    days_covered,
    is_covered,
    plan_windows,
    split_window,
)
from pacs_bridge.backfill_runs import Window


def w(first: str, last: str) -> Window:
    return Window(first_day=date.fromisoformat(first), last_day=date.fromisoformat(last))


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        # within one year: one window
        ("2024-03-01", "2024-03-31", [w("2024-03-01", "2024-03-31")]),
        # across a new year: cut at it
        ("2023-11-15", "2024-02-10", [w("2023-11-15", "2023-12-31"), w("2024-01-01", "2024-02-10")]),
        # a single day
        ("2024-02-29", "2024-02-29", [w("2024-02-29", "2024-02-29")]),
        # whole years in between
        (
            "2021-12-31",
            "2023-01-01",
            [w("2021-12-31", "2021-12-31"), w("2022-01-01", "2022-12-31"), w("2023-01-01", "2023-01-01")],
        ),
    ],
)
def test_plan_windows_cuts_the_range_at_each_new_year(since: str, until: str, expected: list[Window]) -> None:
    """Each window stays within one calendar year, and together they cover the range exactly."""
    assert plan_windows(date.fromisoformat(since), date.fromisoformat(until)) == expected


def test_plan_windows_refuses_an_until_before_since() -> None:
    """--until before --since is the operator's mistake, named."""
    with pytest.raises(ValueError, match="--until 2024-01-01 is before --since 2024-02-01"):
        plan_windows(date(2024, 2, 1), date(2024, 1, 1))


@pytest.mark.parametrize(
    ("window", "halves"),
    [
        # even number of days: equal halves
        (w("2024-01-01", "2024-01-04"), (w("2024-01-01", "2024-01-02"), w("2024-01-03", "2024-01-04"))),
        # odd: the first half is the longer
        (w("2024-01-01", "2024-01-03"), (w("2024-01-01", "2024-01-02"), w("2024-01-03", "2024-01-03"))),
        # two days: one each
        (w("2024-02-28", "2024-02-29"), (w("2024-02-28", "2024-02-28"), w("2024-02-29", "2024-02-29"))),
    ],
)
def test_split_window_gives_two_halves_that_cover_it(window: Window, halves: tuple[Window, Window]) -> None:
    """The halves meet without a gap or an overlap."""
    assert split_window(window) == halves
    assert sum(half.days for half in halves) == window.days


def test_a_single_day_cannot_be_split() -> None:
    """One day is the smallest window: splitting it is refused."""
    with pytest.raises(ValueError, match="single day"):
        split_window(w("2024-01-01", "2024-01-01"))


@pytest.mark.parametrize(
    ("done", "covered"),
    [
        # nothing done
        ([], 0),
        # the whole window done at once
        ([w("2024-01-01", "2024-12-31")], 366),
        # both halves done separately (a window split in an earlier run)
        ([w("2024-01-01", "2024-07-01"), w("2024-07-02", "2024-12-31")], 366),
        # overlapping windows count each day once
        ([w("2024-01-01", "2024-01-10"), w("2024-01-05", "2024-01-20")], 20),
        # windows outside the year do not count
        ([w("2023-12-01", "2024-01-02"), w("2025-01-01", "2025-12-31")], 2),
    ],
)
def test_days_covered_counts_each_day_once(done: list[Window], covered: int) -> None:
    """Windows done in any order, overlapping or not, cover each day of the window at most once."""
    year = w("2024-01-01", "2024-12-31")
    assert days_covered(year, done) == covered
    assert is_covered(year, done) is (covered == 366)


def test_dicom_range_is_one_date_for_a_single_day() -> None:
    """StudyDate matching: a range YYYYMMDD-YYYYMMDD, or one date."""
    assert w("2024-01-01", "2024-06-30").dicom_range() == "20240101-20240630"
    assert w("2024-01-01", "2024-01-01").dicom_range() == "20240101"


def test_a_day_is_halved_by_study_time_down_to_single_seconds_leaving_no_gap() -> None:
    """Halving the whole day again and again reaches single seconds; each range's DICOM form takes in the
    fractions of its last second, so the halves meet with no time between them."""
    first, second = WHOLE_DAY.halves()
    assert (first.dicom_range(), second.dicom_range()) == ("000000-115959.999999", "120000-235959.999999")
    assert (str(first), str(second)) == ("00:00:00..11:59:59", "12:00:00..23:59:59")

    narrowest = WHOLE_DAY
    steps = 0
    while narrowest.splittable:
        narrowest = narrowest.halves()[0]
        steps += 1
    assert (narrowest, steps) == (TimeRange(first_second=0, last_second=0), 17)
    assert narrowest.dicom_range() == "000000-000000.999999"
    with pytest.raises(ValueError, match="single second"):
        narrowest.halves()
    odd = TimeRange(first_second=10, last_second=12)
    assert odd.halves() == (TimeRange(first_second=10, last_second=11), TimeRange(first_second=12, last_second=12))
