"""What the backfill asks of a PACS, whatever protocol it speaks (stdlib and pydicom types only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset

from pacs_bridge.backfill.windows import TimeRange
from pacs_bridge.backfill_runs import Window


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyQuery:
    """The studies of one window (every StudyDate when ``window`` is None), optionally only those with a
    series of ``modality`` or a StudyTime in ``study_times``, or the one study ``study_uid``."""

    window: Window | None = None
    modality: str = ""
    study_uid: str = ""
    study_times: TimeRange | None = None

    def describe(self) -> str:
        """How messages name this query: ``window 2024-01-01..2024-06-30``, ``window 2024-01-03 StudyTime
        08:00:00..11:59:59`` or ``study 1.2.3``."""
        if self.study_uid:
            return f"study {self.study_uid}"
        where = f"window {self.window}" if self.window is not None else "every study date"
        if self.study_times is not None:
            where += f" StudyTime {self.study_times}"
        return f"{where} (modality {self.modality})" if self.modality else where


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundStudies:
    study_uids: tuple[str, ...]
    # The PACS answered as many as it gives at once (its C-FIND maximum, a whole QIDO page): there may be
    # more, and a window of more than one day is split rather than trusted.
    full: bool


class StudySource(Protocol):
    """A PACS queried for studies and for the headers of their instances, never for pixel data."""

    @property
    def name(self) -> str: ...

    def find_studies(self, query: StudyQuery, *, whole: bool) -> FoundStudies:
        """The studies matching ``query``. ``whole``: page through every answer where the protocol can (QIDO
        offset), since the window cannot be split further; otherwise stop at the first full answer.
        Raises ``PacsQueryError`` naming the query, ``PacsUnreachableError`` when the PACS cannot be reached
        at all, ``BackfillStoppedError`` when a stop was requested."""
        ...

    def study_instances(self, study_uid: str) -> list[Dataset]:
        """One header-only dataset per instance of the study, with every element the mapping reads that
        the PACS returns. Raises ``PacsQueryError`` naming the study, ``PacsUnreachableError``,
        ``BackfillStoppedError``."""
        ...

    def close(self) -> None: ...
