"""The ``study_links`` table: what each published study's subject and basedOn reference, and the relink queue.

The publisher records the links it sent (``record``) and reads them back before its next publish of the study,
so that a literal reference is never downgraded (``publish/linking.py``). The relink pass claims the studies
whose waiting links are due (``claim_due``): on PostgreSQL the rows are selected ``FOR UPDATE SKIP LOCKED`` and
leased (``relink_claimed_until``), so bridges sharing the database never look the same study up at once, and a
dead bridge's claims come back when the lease runs out. Only published studies are claimed: a pending study is
resolved afresh when it is published anyway. Each public method is one transaction; SQLAlchemy errors become
``IndexUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from pacs_bridge.errors import IndexUnavailableError
from pacs_bridge.index.models import PublishState, Study, StudyLink
from pacs_bridge.records import Link, StudyAttributes, StudyLinks
from pacs_bridge.study_queue import RelinkCandidate, RelinkCounts

_links = cast(Table, StudyLink.__table__)
_studies = cast(Table, Study.__table__)
_ATTRIBUTES = tuple(f.name for f in fields(StudyAttributes))


def _links_of(row: Any) -> StudyLinks:
    return StudyLinks(
        patient=Link(key=row.patient_key, reference=row.patient_reference),
        order=Link(key=row.order_key, reference=row.order_reference),
        relink_at=row.relink_at,
        relink_attempts=row.relink_attempts,
    )


def _values_of(links: StudyLinks) -> dict[str, Any]:
    return {
        "patient_key": links.patient.key,
        "patient_reference": links.patient.reference,
        "order_key": links.order.key,
        "order_reference": links.order.reference,
        "relink_at": links.relink_at,
        "relink_attempts": links.relink_attempts,
    }


def _waiting(key: Any, reference: Any) -> Any:
    return and_(key.is_not(None), reference.is_(None))


class LinkIndex:
    """The links of published studies, and the relink queue, over one engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise IndexUnavailableError(
                f"the index database failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "check that the database in `database.url` is running, writable and not full"
            ) from exc

    def load(self, study_uid: str) -> StudyLinks | None:
        """The links last recorded for the study; None when it was never published since revision 0009."""
        with self._transaction() as connection:
            row = connection.execute(
                select(_links)
                .join(_studies, _studies.c.id == _links.c.study_id)
                .where(_studies.c.study_uid == study_uid)
            ).first()
        return None if row is None else _links_of(row)

    def record(self, study_uid: str, links: StudyLinks) -> None:
        """Record the links a publish of the study sent, and its relink schedule (a claim held stays held)."""
        with self._transaction() as connection:
            study_id = connection.execute(select(_studies.c.id).where(_studies.c.study_uid == study_uid)).scalar_one()
            values = _values_of(links)
            statement = self._insert(_links).values(study_id=study_id, **values)
            connection.execute(statement.on_conflict_do_update(index_elements=[_links.c.study_id], set_=values))

    def claim_due(self, now: datetime, *, limit: int, lease: timedelta, claimer: str) -> list[RelinkCandidate]:
        """Lease up to ``limit`` published studies whose relink lookup is due, the longest-due first."""
        with self._transaction() as connection:
            rows = connection.execute(
                select(_links, *(_studies.c[name] for name in _ATTRIBUTES))
                .join(_studies, _studies.c.id == _links.c.study_id)
                .where(_links.c.relink_at <= now)
                .where(or_(_links.c.relink_claimed_until.is_(None), _links.c.relink_claimed_until < now))
                .where(_studies.c.publish_state == PublishState.PUBLISHED.value)
                .order_by(_links.c.relink_at, _links.c.study_id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=_links)
            ).all()
            if rows:
                connection.execute(
                    update(_links)
                    .where(_links.c.study_id.in_([row.study_id for row in rows]))
                    .values(relink_claimed_until=now + lease, relink_claimed_by=claimer)
                )
        return [
            RelinkCandidate(
                study=StudyAttributes(**{name: getattr(row, name) for name in _ATTRIBUTES}), links=_links_of(row)
            )
            for row in rows
        ]

    def record_relink(self, study_uid: str, links: StudyLinks, *, republish_at: datetime | None) -> None:
        """Record what a relink lookup found and release the claim; ``republish_at``: a literal reference was
        found, so the study is made due for publishing then (if it is published: a pending one is on its way,
        a failed one waits for the operator)."""
        with self._transaction() as connection:
            study_id = connection.execute(select(_studies.c.id).where(_studies.c.study_uid == study_uid)).scalar_one()
            connection.execute(
                update(_links)
                .where(_links.c.study_id == study_id)
                .values(**_values_of(links), relink_claimed_until=None, relink_claimed_by=None)
            )
            if republish_at is not None:
                connection.execute(
                    update(_studies)
                    .where(_studies.c.id == study_id, _studies.c.publish_state == PublishState.PUBLISHED.value)
                    .values(  # the link found is the study's last change (and its publish latency's start)
                        publish_state=PublishState.PENDING.value,
                        due_at=republish_at,
                        first_change_at=republish_at,
                        last_change_at=republish_at,
                        attempts=0,
                        next_attempt_at=None,
                    )
                )

    def release(self, study_uids: Sequence[str]) -> None:
        """Give claimed studies back untouched (the server stopped answering): due again at once."""
        if not study_uids:
            return
        with self._transaction() as connection:
            ids = select(_studies.c.id).where(_studies.c.study_uid.in_(list(study_uids))).scalar_subquery()
            connection.execute(
                update(_links)
                .where(_links.c.study_id.in_(ids))
                .values(relink_claimed_until=None, relink_claimed_by=None)
            )

    def counts(self, now: datetime) -> RelinkCounts:
        with self._transaction() as connection:
            patient_waiting, order_waiting, next_at = connection.execute(
                select(
                    func.count().filter(_waiting(_links.c.patient_key, _links.c.patient_reference)),
                    func.count().filter(_waiting(_links.c.order_key, _links.c.order_reference)),
                    func.min(_links.c.relink_at),
                )
            ).one()
            due = connection.execute(
                select(func.count())
                .select_from(_links.join(_studies, _studies.c.id == _links.c.study_id))
                .where(_links.c.relink_at <= now, _studies.c.publish_state == PublishState.PUBLISHED.value)
            ).scalar_one()
        return RelinkCounts(
            patient_waiting=int(patient_waiting),
            order_waiting=int(order_waiting),
            due=int(due),
            next_at=cast("datetime | None", next_at),
        )
