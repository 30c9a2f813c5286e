"""Each study's publish state: due studies claimed for publishing, what publishing them came to (the rules:
``index/publish_results.py``), backoff and its wake-up, the Endpoints sent, the counts by state, and the
operator's requests (status, retry, republish). Each public method is one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, case, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_bridge.index.database import IndexDatabase, chunks
from pacs_bridge.index.models import EndpointPublication, PublishState, Study
from pacs_bridge.index.publish_results import apply_publish_result
from pacs_bridge.study_queue import ClaimedStudy, Published, PublishResult, Refused, Released, RetryLater, StateCounts


class PublishStates:
    """The publish state of the index's studies (the publisher's and the operator's side of the ``Index``)."""

    def __init__(self, db: IndexDatabase) -> None:
        self._db = db

    def claim_due_studies(self, now: datetime, *, limit: int, lease: timedelta, claimer: str) -> list[ClaimedStudy]:
        """Lease up to ``limit`` due studies for publishing, most overdue first.

        On PostgreSQL the rows are selected ``FOR UPDATE SKIP LOCKED``, so bridges sharing the database never
        claim the same study; the lease (``claimed_until``) keeps it theirs while they publish outside the
        transaction, and expires if that bridge dies.
        """
        with self._db.unit_of_work() as session:
            rows = session.execute(
                select(Study.id, Study.study_uid, Study.attempts, Study.last_change_at, Study.published_version)
                .where(Study.due_at <= now)
                .where(or_(Study.next_attempt_at.is_(None), Study.next_attempt_at <= now))
                .where(or_(Study.claimed_until.is_(None), Study.claimed_until < now))
                .order_by(Study.due_at, Study.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                session.execute(
                    update(Study)
                    .where(Study.id.in_([row.id for row in rows]))
                    .values(claimed_until=now + lease, claimed_by=claimer)
                )
            return [
                ClaimedStudy(
                    study_uid=row.study_uid,
                    attempts=row.attempts,
                    last_change_at=row.last_change_at,
                    published_version=row.published_version,
                    claimed_until=now + lease,
                )
                for row in rows
            ]

    def mark_published(
        self,
        study_uid: str,
        *,
        change_seq: int,
        content_hash: str,
        now: datetime,
        sent: bool,
        version_id: str | None = None,
    ) -> None:
        """Record that the snapshot at ``change_seq`` is on the FHIR server (``sent``: we PUT it just now, and
        the server called it ``version_id``).

        If the study changed while it was being published, it stays pending: its newer due time stands.
        """
        published = Published(
            study_uid=study_uid,
            change_seq=change_seq,
            content_hash=content_hash,
            at=now,
            sent=sent,
            version_id=version_id,
        )
        self.record_publish_results([published])

    def mark_retry(
        self, study_uid: str, *, error: str, next_attempt_at: datetime, not_before: datetime | None = None
    ) -> int:
        """Record a failed attempt that may pass by itself; the study stays pending. Returns the attempt count.

        ``not_before``: the server asked for no retry before then (Retry-After): ``wake_backed_off`` keeps it, a floor.
        """
        with self._db.unit_of_work() as session:
            study = self._locked_study(session, study_uid)
            retry = RetryLater(study_uid=study_uid, error=error, next_attempt_at=next_attempt_at, not_before=not_before)
            apply_publish_result(study, retry)
            return study.attempts

    def record_publish_results(self, results: Sequence[PublishResult]) -> None:
        """Record what a batch of publishing attempts came to, in one transaction (``index/publish_results.py``
        says what each result writes). The rows are locked in Study Instance UID order, so two bridges recording
        at once wait for each other rather than deadlock. A study no longer in the index is skipped."""
        if not results:
            return
        by_uid = {result.study_uid: result for result in results}
        with self._db.unit_of_work() as session:
            for chunk in chunks(sorted(by_uid)):
                locked = session.scalars(
                    select(Study).where(Study.study_uid.in_(chunk)).order_by(Study.study_uid).with_for_update()
                )
                for study in locked:
                    apply_publish_result(study, by_uid[study.study_uid])

    def next_due_at(self) -> datetime | None:
        """When the earliest study with something to publish can be claimed: the latest of its debounce
        ``due_at``, its backoff ``next_attempt_at`` and another pass's lease ``claimed_until`` (the conditions of
        ``claim_due_studies``). None when nothing waits to be published."""

        def later(first: Any, second: Any) -> Any:
            return case((second > first, second), else_=first)

        claimable_at = later(later(Study.due_at, Study.next_attempt_at), Study.claimed_until)
        with self._db.unit_of_work(read_only=True) as session:
            earliest = session.execute(select(func.min(claimable_at)).where(Study.due_at.is_not(None))).scalar()
        return cast("datetime | None", earliest)  # UtcDateTime's result processing: aware UTC

    @staticmethod
    def _wakeable(now: datetime) -> Any:
        """Pending studies waiting out a backoff that ``wake_backed_off`` brings forward: to now, or to the
        server's own ``retry_not_before`` (Retry-After, a 429's backoff) when that comes before the backoff ends."""
        return and_(
            Study.publish_state == PublishState.PENDING.value,
            Study.next_attempt_at > now,
            or_(Study.retry_not_before.is_(None), Study.retry_not_before < Study.next_attempt_at),
        )

    def wakeable_count(self, now: datetime) -> int:
        """How many studies ``wake_backed_off`` would bring forward now."""
        with self._db.unit_of_work(read_only=True) as session:
            return int(session.execute(select(func.count()).select_from(Study).where(self._wakeable(now))).scalar_one())

    def wake_backed_off(self, now: datetime) -> int:
        """For when the FHIR server answers again: every study waiting out a backoff is due now, except that
        where the server asked for a later retry (``retry_not_before``: Retry-After, 429) it is due at that time,
        not at the end of its exponential backoff. Returns how many studies were brought forward."""
        at_now = literal(now, type_=Study.next_attempt_at.type)
        due = case((Study.retry_not_before > at_now, Study.retry_not_before), else_=at_now)
        with self._db.unit_of_work() as session:
            result = session.execute(update(Study).where(self._wakeable(now)).values(next_attempt_at=due))
            return int(getattr(result, "rowcount", 0) or 0)

    def mark_failed(self, study_uid: str, *, change_seq: int, error: str) -> None:
        """Record a refusal that will not pass by itself. A change newer than ``change_seq`` keeps it pending."""
        self.record_publish_results([Refused(study_uid=study_uid, change_seq=change_seq, error=error)])

    def release_claim(self, study_uid: str) -> None:
        """Give a claimed study back without recording anything (e.g. on shutdown)."""
        self.record_publish_results([Released(study_uid=study_uid)])

    @staticmethod
    def _locked_study(session: Session, study_uid: str) -> Study:
        return session.scalars(select(Study).where(Study.study_uid == study_uid).with_for_update()).one()

    # ---- endpoints and overview ------------------------------------------------------------------------

    def endpoint_hashes(self) -> dict[str, str]:
        """Content hash of every Endpoint last PUT, by endpoint id."""
        with self._db.unit_of_work(read_only=True) as session:
            rows = session.execute(select(EndpointPublication.endpoint_id, EndpointPublication.content_hash))
            return {endpoint_id: digest for endpoint_id, digest in rows}

    def mark_endpoint_published(self, endpoint_id: str, *, content_hash: str, now: datetime) -> None:
        """Record the Endpoint's content as sent. One statement that inserts or updates: two bridges sending the
        same new Endpoint at once both record it (a read, then an insert, failed the second on the key)."""
        insert = postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert
        table = cast(Table, EndpointPublication.__table__)
        values = {"content_hash": content_hash, "published_at": now}
        statement = (
            insert(table)
            .values(endpoint_id=endpoint_id, **values)
            .on_conflict_do_update(index_elements=[table.c.endpoint_id], set_=values)
        )
        with self._db.unit_of_work() as session:
            session.execute(statement)

    def count_by_state(self) -> StateCounts:
        with self._db.unit_of_work(read_only=True) as session:
            rows = session.execute(select(Study.publish_state, func.count()).group_by(Study.publish_state))
            counts: dict[str, int] = {state: count for state, count in rows}
        return StateCounts(
            pending=counts.get(PublishState.PENDING.value, 0),
            published=counts.get(PublishState.PUBLISHED.value, 0),
            failed=counts.get(PublishState.FAILED.value, 0),
        )

    def studies_in_state(self, state: PublishState, *, limit: int = 100) -> list[StudyStatus]:
        """Studies in ``state``, the longest-waiting first (by their first unpublished change)."""
        with self._db.unit_of_work(read_only=True) as session:
            rows = session.scalars(
                select(Study)
                .where(Study.publish_state == state.value)
                .order_by(Study.first_change_at, Study.last_change_at, Study.id)
                .limit(limit)
            ).all()
            return [_study_status(row) for row in rows]

    def study_status(self, study_uid: str) -> StudyStatus | None:
        with self._db.unit_of_work(read_only=True) as session:
            row = session.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
            return None if row is None else _study_status(row)

    def retry_failed(self, now: datetime, *, study_uid: str | None = None) -> list[str]:
        """Make failed studies (all, or the one named) due now, with a fresh attempt count."""
        with self._db.unit_of_work() as session:
            query = select(Study).where(Study.publish_state == PublishState.FAILED.value).with_for_update()
            if study_uid is not None:
                query = query.where(Study.study_uid == study_uid)
            studies = session.scalars(query).all()
            for study in studies:
                self._make_due_now(study, now)
            return [study.study_uid for study in studies]

    def republish(
        self, now: datetime, *, study_uid: str | None = None, changed_since: datetime | None = None
    ) -> list[str]:
        """Make studies due now and forget their published hash, so they are rebuilt and sent even if unchanged.

        Names one study, or every study whose last change is at or after ``changed_since``.
        """
        if (study_uid is None) == (changed_since is None):
            raise ValueError("republish takes exactly one of study_uid and changed_since")
        with self._db.unit_of_work() as session:
            query = select(Study).with_for_update()
            if study_uid is not None:
                query = query.where(Study.study_uid == study_uid)
            else:
                query = query.where(Study.last_change_at >= changed_since)
            studies = session.scalars(query).all()
            for study in studies:
                study.published_hash = None
                self._make_due_now(study, now)
            return [study.study_uid for study in studies]

    @staticmethod
    def _make_due_now(study: Study, now: datetime) -> None:
        study.publish_state = PublishState.PENDING.value
        study.due_at = now
        if study.first_change_at is None:
            study.first_change_at = now
        study.attempts = 0
        study.next_attempt_at = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyStatus:
    """One study's publish state, as the operator sees it."""

    study_uid: str
    publish_state: str
    first_change_at: datetime | None
    last_change_at: datetime | None
    due_at: datetime | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    published_at: datetime | None


def _study_status(study: Study) -> StudyStatus:
    return StudyStatus(
        study_uid=study.study_uid,
        publish_state=study.publish_state,
        first_change_at=study.first_change_at,
        last_change_at=study.last_change_at,
        due_at=study.due_at,
        attempts=study.attempts,
        next_attempt_at=study.next_attempt_at,
        last_error=study.last_error,
        published_at=study.published_at,
    )
