"""What a publishing attempt leaves on its study's row: the four results and the rule each one writes.

The publisher hands a batch of them to ``Index.record_publish_results``, which locks the batch's rows and
applies them in one transaction; ``Index.mark_published`` and its siblings apply one. Every result also gives
the study's claim back (``claimed_until``, ``claimed_by``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pacs_bridge.index.models import PublishState, Study


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


def apply_publish_result(study: Study, result: PublishResult) -> None:
    """Write ``result`` on ``study``'s row (locked by the caller) and give its claim back."""
    study.claimed_until = None
    study.claimed_by = None
    if isinstance(result, Published):
        study.published_hash = result.content_hash
        study.published_seq = result.change_seq
        if result.sent:
            study.published_at = result.at
            study.published_version = result.version_id
        study.attempts = 0
        study.next_attempt_at = None
        study.last_error = None
        if study.change_seq == result.change_seq:
            study.publish_state = PublishState.PUBLISHED.value
            study.due_at = None
            study.first_change_at = None
    elif isinstance(result, RetryLater):
        study.attempts += 1
        study.last_error = result.error
        study.next_attempt_at = result.next_attempt_at
        study.retry_not_before = result.not_before
    elif isinstance(result, Refused):
        study.attempts += 1
        study.last_error = result.error
        study.next_attempt_at = None
        if study.change_seq == result.change_seq:
            study.publish_state = PublishState.FAILED.value
            study.due_at = None
