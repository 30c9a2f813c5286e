"""A backfill run as the runner, its ledger in the index (``index/backfill_progress.py``), ``status`` and the
metrics see it: what it asks for, its state and counters, and the StudyDate windows it did (planned by
``backfill/windows.py``). Values only (stdlib).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Window:
    """StudyDate from ``first_day`` to ``last_day``, both included."""

    first_day: date
    last_day: date

    def __post_init__(self) -> None:
        if self.last_day < self.first_day:
            raise ValueError(f"a window cannot end ({self.last_day}) before it starts ({self.first_day})")

    @property
    def days(self) -> int:
        return (self.last_day - self.first_day).days + 1

    @property
    def splittable(self) -> bool:
        return self.days > 1

    def dicom_range(self) -> str:
        """The DICOM date range matching this window: ``YYYYMMDD-YYYYMMDD``, or one date for a single day."""
        first = self.first_day.strftime("%Y%m%d")
        return first if self.first_day == self.last_day else f"{first}-{self.last_day.strftime('%Y%m%d')}"

    def __str__(self) -> str:
        return str(self.first_day) if self.first_day == self.last_day else f"{self.first_day}..{self.last_day}"


class RunState(enum.StrEnum):
    RUNNING = "running"  # a backfill process is (or was, if it died) working on it
    STOPPED = "stopped"  # stopped by SIGINT/SIGTERM: the same command continues it
    INCOMPLETE = "incomplete"  # ended with windows or studies that failed: the same command retries them
    COMPLETE = "complete"  # every window done


@dataclass(frozen=True, slots=True, kw_only=True)
class RunKey:
    """What a backfill asks for, as its flags say (None: the flag was not given, so that a run without
    --until started yesterday is continued today); runs with equal keys continue each other."""

    source: str
    since: date | None = None
    until: date | None = None
    modality: str = ""
    study_uid: str = ""

    def text(self) -> str:
        return "|".join((self.source, str(self.since or ""), str(self.until or ""), self.modality, self.study_uid))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCounts:
    """What a run did; also the increments written as it goes."""

    days_done: int = 0
    studies_found: int = 0
    studies_indexed: int = 0
    studies_unchanged: int = 0
    instances_indexed: int = 0
    failures: int = 0

    def __add__(self, other: RunCounts) -> RunCounts:
        return RunCounts(**{name: getattr(self, name) + getattr(other, name) for name in _COUNT_FIELDS})

    def __sub__(self, other: RunCounts) -> RunCounts:
        return RunCounts(**{name: getattr(self, name) - getattr(other, name) for name in _COUNT_FIELDS})

    @property
    def is_empty(self) -> bool:
        return self == RunCounts()


_COUNT_FIELDS = tuple(RunCounts.__dataclass_fields__)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenedRun:
    run_id: int
    resumed: bool  # an earlier, unfinished run with the same key is continued
    windows_done: tuple[Window, ...]
    whole_query_done: bool  # a one-study run: its study was indexed
    counts: RunCounts  # of its windows done (days_done recomputed by the runner)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """One run as ``pacs-bridge status`` shows it."""

    run_id: int
    source: str
    since: date | None
    until: date | None
    modality: str
    study_uid: str
    state: str
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    days_total: int
    counts: RunCounts
    last_error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillTotals:
    """What only grows (Prometheus counters): every window done's figures and every failure reported, added
    up; and the run the gauges follow: the running one that recorded progress last, else the last updated."""

    counts: RunCounts
    latest: RunStatus | None
