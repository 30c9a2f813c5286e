"""IHE IOCM rejection notes: what a note withdraws is deleted from the index and recorded in
``rejected_instances``, so that it is never indexed again; and what was withdrawn from a study, for its snapshot."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Row, delete, exists, select

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.index.changes import change_noted
from pacs_bridge.index.database import IndexDatabase, chunks
from pacs_bridge.index.models import RejectedInstance
from pacs_bridge.index.statements import INSTANCES, SERIES, STUDIES, IngestStatements
from pacs_bridge.records import RecordOutcome, RejectionNote, RejectionReason, StudyWithdrawal

log = structlog.get_logger("pacs_bridge.index")


class RejectionNotes:
    """Applies rejection notes to the index (``Index.record_instance`` hands them over)."""

    def __init__(self, db: IndexDatabase, statements: IngestStatements, debounce: DebounceSettings) -> None:
        self._db = db
        self._statements = statements
        self._debounce = debounce

    def apply(self, note: RejectionNote, received_at: datetime) -> RecordOutcome:
        """Withdraw what an IOCM rejection note references, in one transaction; the note itself is not indexed.

        Every referenced SOP Instance UID is recorded as rejected (so a later arrival stays out), even one
        never received; indexed ones are deleted, then series left empty, and each study that lost instances
        is changed (``change_seq`` + 1, new due time) so the publisher sends it again. A note sent again, or
        one naming only unknown instances, changes no study.

        Concurrency: each referenced study's row is locked first (created if absent, and removed again if it
        stays empty), and ``InstanceIngest.record_instance`` locks the same row before its rejected check. So a
        note and an instance of one study arriving together at two bridges sharing PostgreSQL are serialised:
        either the instance is indexed first and the note deletes it, or the note commits first and the
        instance sees the rejection. Studies are locked in Study Instance UID order, so two notes cannot deadlock.
        """
        with self._db.translated_errors(), self._db.engine.begin() as connection:
            statements = self._statements
            locked: dict[int, Row[Any]] = {}
            created: set[int] = set()
            for study_uid in sorted({reference.study_uid for reference in note.references}):
                inserted = connection.execute(statements.create_study, {"study_uid": study_uid}).first()
                study = connection.execute(statements.lock_study, {"uid": study_uid}).one()
                locked[study.id] = study
                if inserted is not None:
                    created.add(study.id)
            indexed = _indexed_instances(connection, [ref.sop_instance_uid for ref in note.references])
            others = sorted({row.study_id for row in indexed.values()} - locked.keys())
            if others:  # instances indexed under another study than the note says: withdrawn all the same
                for study in connection.execute(statements.lock_studies_by_id, {"ids": others}):
                    locked[study.id] = study
            connection.execute(
                statements.insert_rejected,
                [
                    {
                        "sop_instance_uid": reference.sop_instance_uid,
                        "study_uid": row.study_uid if row is not None else reference.study_uid,
                        "series_uid": row.series_uid if row is not None else reference.series_uid,
                        "modality": row.modality if row is not None else "",
                        "reason_code": note.reason.value,
                        "note_uid": note.note_uid,
                        "rejected_at": received_at,
                    }
                    for reference in note.references
                    for row in [indexed.get(reference.sop_instance_uid)]
                ],
            )
            instance_ids = [row.id for row in indexed.values()]
            for chunk in chunks(instance_ids):
                connection.execute(delete(INSTANCES).where(INSTANCES.c.id.in_(chunk)))
            for chunk in chunks(sorted({row.series_id for row in indexed.values()})):
                connection.execute(
                    delete(SERIES)
                    .where(SERIES.c.id.in_(chunk))
                    .where(~exists().where(INSTANCES.c.series_id == SERIES.c.id))
                )
            changed = sorted({row.study_id for row in indexed.values()})
            for study_id in changed:
                values = change_noted(locked[study_id], received_at, self._debounce)
                connection.execute(statements.update_study, {"_id": study_id, **values})
            for chunk in chunks(sorted(created)):
                connection.execute(delete(STUDIES).where(STUDIES.c.id.in_(chunk)))
        log.info(
            "rejection_note_applied",
            note_uid=note.note_uid,
            reason=note.reason.value,
            referenced=len(note.references),
            removed=len(instance_ids),
            changed_studies=[locked[study_id].study_uid for study_id in changed],
        )
        return RecordOutcome.REJECTION_NOTE


def _indexed_instances(connection: Connection, sop_instance_uids: list[str]) -> dict[str, Any]:
    """Where each of these SOP Instance UIDs is indexed (instance, series and study rows), by UID."""
    found: dict[str, Any] = {}
    for chunk in chunks(sop_instance_uids):
        rows = connection.execute(
            select(
                INSTANCES.c.id,
                INSTANCES.c.sop_instance_uid,
                INSTANCES.c.series_id,
                SERIES.c.series_uid,
                SERIES.c.modality,
                SERIES.c.study_id,
                STUDIES.c.study_uid,
            )
            .join(SERIES, SERIES.c.id == INSTANCES.c.series_id)
            .join(STUDIES, STUDIES.c.id == SERIES.c.study_id)
            .where(INSTANCES.c.sop_instance_uid.in_(chunk))
        )
        found.update((row.sop_instance_uid, row) for row in rows)
    return found


def withdrawal(connection: Connection, study_uid: str) -> StudyWithdrawal | None:
    rows = connection.execute(
        select(RejectedInstance.reason_code, RejectedInstance.modality)
        .where(RejectedInstance.study_uid == study_uid)
        .distinct()
    ).all()
    if not rows:
        return None
    return StudyWithdrawal(
        reasons=tuple(sorted({RejectionReason(row.reason_code) for row in rows})),
        modalities=tuple(sorted({row.modality for row in rows if row.modality})),
    )
