"""The publish queue as the index keeps it and the publisher works it: the values the two exchange (a claimed
study, what an attempt came to, the queue's counts) and, as protocols, what the publisher and the relink pass
ask of the index. ``index`` implements the protocols; ``publish`` is given an implementation and never imports
the index, nor the index ``publish``.

What each publish result writes on its study's row: ``index/publish_results.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from pacs_bridge.records import StudyAttributes, StudyLinks, StudySnapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedStudy:
    study_uid: str
    attempts: int  # failed attempts since the last success, for the backoff
    last_change_at: datetime | None = None  # for the publish latency metric
    published_version: str | None = None  # the server's version id of what we last wrote, for If-Match
    claimed_until: datetime | None = None  # when the claim's lease ends


@dataclass(frozen=True, slots=True, kw_only=True)
class StateCounts:
    pending: int
    published: int
    failed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    """The snapshot at ``change_seq`` is on the FHIR server (``sent``: we PUT it just now, and the server
    called it ``version_id``; else it equalled what we last sent). A change newer than ``change_seq`` keeps the
    study pending with its due time: no lost update."""

    study_uid: str
    change_seq: int
    content_hash: str
    at: datetime
    sent: bool
    version_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryLater:
    """A failure that may pass by itself: the study stays pending until ``next_attempt_at``; ``not_before``
    is the server's own ``Retry-After``, which no recovery brings forward."""

    study_uid: str
    error: str
    next_attempt_at: datetime
    not_before: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """A refusal that will not pass by itself: failed, unless the study changed after ``change_seq``."""

    study_uid: str
    change_seq: int
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Released:
    """Not attempted, or our own failure: the claim is given back and nothing else changes."""

    study_uid: str


PublishResult = Published | RetryLater | Refused | Released


@dataclass(frozen=True, slots=True, kw_only=True)
class RelinkCandidate:
    """A published study whose waiting links are due for a lookup, with what the lookup needs."""

    study: StudyAttributes
    links: StudyLinks


@dataclass(frozen=True, slots=True, kw_only=True)
class RelinkCounts:
    """The relink queue as the operator sees it (``status``, metrics)."""

    patient_waiting: int  # studies whose subject waits for a Patient reference
    order_waiting: int  # studies whose basedOn waits for a ServiceRequest reference
    due: int  # published studies whose lookup is due now (a growing number: relinking does not keep up)
    next_at: datetime | None  # the earliest scheduled lookup


class LinkStore(Protocol):
    """The links each published study's subject and basedOn carry, and the relink queue (``index/links.py``)."""

    def load(self, study_uid: str) -> StudyLinks | None: ...

    def record(self, study_uid: str, links: StudyLinks) -> None: ...

    def claim_due(self, now: datetime, *, limit: int, lease: timedelta, claimer: str) -> list[RelinkCandidate]: ...

    def record_relink(self, study_uid: str, links: StudyLinks, *, republish_at: datetime | None) -> None: ...

    def release(self, study_uids: Sequence[str]) -> None: ...


class PublishQueue(Protocol):
    """What the publisher asks of the index (``index.repository.Index``): claim due studies, read their
    snapshots, record what the attempts came to."""

    @property
    def links(self) -> LinkStore: ...

    def exclusive(self, name: str) -> AbstractContextManager[None]: ...

    def next_due_at(self) -> datetime | None: ...

    def claim_due_studies(self, now: datetime, *, limit: int, lease: timedelta, claimer: str) -> list[ClaimedStudy]: ...

    def load_snapshot(self, study_uid: str) -> StudySnapshot: ...

    def load_snapshots(self, study_uids: Sequence[str]) -> dict[str, StudySnapshot]: ...

    def record_publish_results(self, results: Sequence[PublishResult]) -> None: ...

    def endpoint_hashes(self) -> dict[str, str]: ...

    def mark_endpoint_published(self, endpoint_id: str, *, content_hash: str, now: datetime) -> None: ...

    def wake_backed_off(self, now: datetime) -> int: ...

    def count_by_state(self) -> StateCounts: ...
