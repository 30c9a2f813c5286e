"""What publishing one claimed study came to (``StudyResult``), and how a recorded one is logged and counted.

The publisher (``publish/publisher.py``) makes one ``StudyResult`` per claimed study on its workers, records a
batch of them in the index, then reports each with ``report_result``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.client import PutResult
from pacs_bridge.observe import BridgeObserver
from pacs_bridge.publish.outage import is_outage
from pacs_bridge.publish.references import StudyReferences
from pacs_bridge.study_queue import ClaimedStudy, PublishResult, Refused

log = structlog.get_logger("pacs_bridge.publish")


class PublishOutcome(enum.Enum):
    PUBLISHED = "published"  # PUT done
    UNCHANGED = "unchanged"  # the resource equals the one last published: nothing sent
    RETRY_SCHEDULED = "retry_scheduled"  # a failure that may pass; pending with backoff
    FAILED = "failed"  # refused by the server; needs a change or the operator
    ERROR = "error"  # our own failure (e.g. the database); released, and tried again by a later pass
    DEFERRED = "deferred"  # claimed but not tried (an outage began, the bridge stops, the lease ran short)


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyResult:
    """What publishing one claimed study came to: the outcome, what the index records, and what is logged."""

    claimed: ClaimedStudy
    outcome: PublishOutcome
    record: PublishResult
    error: PublishError | None = None
    retry_in: timedelta | None = None
    put: PutResult | None = None
    series: int = 0
    instances: int = 0
    references: StudyReferences | None = None  # what subject and basedOn referenced, recorded after the batch

    @property
    def server_answered(self) -> bool:
        """Whether the FHIR server answered this study's last request (a success, or a refusal of it)."""
        if self.error is None:
            return self.put is not None
        return self.error.http_status is not None and not is_outage(self.error)


def report_result(result: StudyResult, observer: BridgeObserver, clock: Callable[[], datetime]) -> None:
    """Log one recorded result and count it (the outage's own failures only at debug level: the outage
    is logged as a whole)."""
    claimed, outcome, error = result.claimed, result.outcome, result.error
    attempt = claimed.attempts + 1
    if outcome is PublishOutcome.PUBLISHED and result.put is not None:
        observer.publish_attempted(http_status=result.put.http_status, outcome=outcome.value)
        if claimed.last_change_at is not None:
            waited = (clock() - claimed.last_change_at).total_seconds()
            observer.study_published(seconds_since_last_change=waited)
        log.info(
            "study_published",
            study_uid=claimed.study_uid,
            http_status=result.put.http_status,
            version_id=result.put.version_id,
            series=result.series,
            instances=result.instances,
            attempt=attempt,
        )
    elif outcome is PublishOutcome.UNCHANGED:
        log.info("study_unchanged", study_uid=claimed.study_uid, change_seq=getattr(result.record, "change_seq", 0))
    elif outcome is PublishOutcome.RETRY_SCHEDULED and error is not None and result.retry_in is not None:
        observer.publish_attempted(http_status=error.http_status, outcome=outcome.value)
        emit = log.debug if is_outage(error) else log.warning
        emit(
            "publish_retry_scheduled",
            study_uid=claimed.study_uid,
            attempt=attempt,
            http_status=error.http_status,
            retry_in_seconds=round(result.retry_in.total_seconds(), 1),
            error=error.detail,
        )
    elif outcome is PublishOutcome.FAILED and error is not None and isinstance(result.record, Refused):
        observer.publish_attempted(http_status=error.http_status, outcome=outcome.value)
        log.error(
            "publish_failed",
            study_uid=claimed.study_uid,
            attempt=attempt,
            http_status=error.http_status,
            error=result.record.error,
        )
