"""Pure planning of the StudyDate windows (``backfill_runs.Window``) a backfill asks the PACS about.

A backfill covers ``[since, until]`` in calendar-year windows. A window whose answer is full (the PACS's
maximum of C-FIND answers, or a whole QIDO page) is split in two halves, down to a single day, so that no
query asks for more than the PACS will give. A single day still full is asked by StudyTime ranges
(``TimeRange``), halved likewise down to a single second. The windows done are kept in the index; a window is skipped
when windows done cover every one of its days, which is how a resumed run skips what it did before even
though it splits the same way again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from pacs_bridge.backfill_runs import Window

EARLIEST_STUDY_DATE = date(1900, 1, 1)  # --since when not given: before any digital image


SECONDS_PER_DAY = 24 * 60 * 60


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class TimeRange:
    """StudyTime from ``first_second`` to ``last_second`` of the day (seconds since midnight), both included."""

    first_second: int
    last_second: int

    def __post_init__(self) -> None:
        if not 0 <= self.first_second <= self.last_second < SECONDS_PER_DAY:
            raise ValueError(f"a time range runs within one day, forwards: {self.first_second}..{self.last_second}")

    @property
    def splittable(self) -> bool:
        return self.last_second > self.first_second

    def halves(self) -> tuple[TimeRange, TimeRange]:
        """The two halves of a range of more than one second (the first the longer when the seconds are odd)."""
        if not self.splittable:
            raise ValueError(f"time range {self} is a single second and cannot be split")
        middle = self.first_second + (self.last_second - self.first_second + 1 + 1) // 2 - 1
        return (
            TimeRange(first_second=self.first_second, last_second=middle),
            TimeRange(first_second=middle + 1, last_second=self.last_second),
        )

    def dicom_range(self) -> str:
        """The DICOM time range matching it, fractions of its last second included: ``HHMMSS-HHMMSS.999999``."""
        return f"{_hhmmss(self.first_second, '')}-{_hhmmss(self.last_second, '')}.999999"

    def __str__(self) -> str:
        return f"{_hhmmss(self.first_second, ':')}..{_hhmmss(self.last_second, ':')}"


WHOLE_DAY = TimeRange(first_second=0, last_second=SECONDS_PER_DAY - 1)


def _hhmmss(seconds: int, separator: str) -> str:
    return separator.join(f"{part:02d}" for part in (seconds // 3600, seconds // 60 % 60, seconds % 60))


def plan_windows(since: date, until: date) -> list[Window]:
    """``[since, until]`` cut at each new year: the windows a backfill starts from, oldest first."""
    if until < since:
        raise ValueError(f"--until {until} is before --since {since}; give the earlier date as --since")
    windows = []
    first = since
    while first <= until:
        last = min(date(first.year, 12, 31), until)
        windows.append(Window(first_day=first, last_day=last))
        first = last + timedelta(days=1)
    return windows


def split_window(window: Window) -> tuple[Window, Window]:
    """The two halves of a window of more than one day (the first half the longer when the days are odd)."""
    if not window.splittable:
        raise ValueError(f"window {window} is a single day and cannot be split")
    middle = window.first_day + timedelta(days=(window.days + 1) // 2 - 1)
    return (
        Window(first_day=window.first_day, last_day=middle),
        Window(first_day=middle + timedelta(days=1), last_day=window.last_day),
    )


def days_covered(window: Window, done: Iterable[Window]) -> int:
    """How many days of ``window`` the windows in ``done`` cover (they may overlap each other)."""
    covered = 0
    cursor = window.first_day
    for other in sorted(done):
        if other.last_day < cursor:
            continue
        if other.first_day > window.last_day:
            break
        start = max(other.first_day, cursor)
        end = min(other.last_day, window.last_day)
        if end >= start:
            covered += (end - start).days + 1
            cursor = end + timedelta(days=1)
    return covered


def is_covered(window: Window, done: Sequence[Window]) -> bool:
    """Whether the windows in ``done`` cover every day of ``window``."""
    return days_covered(window, done) == window.days
