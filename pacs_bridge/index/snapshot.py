"""A study's snapshot: everything indexed for it, read for the publisher.

Snapshots are read with plain column queries and assembled and sorted in Python: no per-instance ORM objects,
and the same order (hence the same content hash) on SQLite and PostgreSQL whatever their collation.
"""

from __future__ import annotations

from collections import defaultdict

from pacs_bridge.errors import UnknownStudyError
from pacs_bridge.index.database import IndexDatabase
from pacs_bridge.index.rejection_notes import withdrawal as read_withdrawal
from pacs_bridge.index.statements import SERIES_FIELDS, STUDY_FIELDS, SnapshotStatements
from pacs_bridge.records import InstanceSnapshot, SeriesAttributes, SeriesSnapshot, StudyAttributes, StudySnapshot


class SnapshotReader:
    """Reads studies' snapshots with statements built once."""

    def __init__(self, db: IndexDatabase) -> None:
        self._db = db
        self._snapshot_statements = SnapshotStatements()

    def load_snapshot(self, study_uid: str) -> StudySnapshot:
        """Everything indexed for one study, series ordered by number then UID, instances likewise.

        Read with statements built once, on a connection rather than a session: the publisher loads one snapshot
        per study, and for a small study the ORM's bookkeeping cost more than the three queries.
        """
        statements = self._snapshot_statements
        with self._db.translated_errors(), self._db.read_engine.begin() as connection:
            study = connection.execute(statements.study, {"uid": study_uid}).first()
            if study is None:
                raise UnknownStudyError(f"study {study_uid} is not in the index")
            attributes = StudyAttributes(
                study_uid=study.study_uid, **{name: getattr(study, name) for name in STUDY_FIELDS}
            )
            series_rows = connection.execute(statements.series, {"study_id": study.id}).all()
            instances_by_series: dict[int, list[InstanceSnapshot]] = defaultdict(list)
            instance_rows = connection.execute(statements.instances, {"study_id": study.id})
            for series_id, sop_instance_uid, sop_class_uid, instance_number, laterality, title in instance_rows:
                instances_by_series[series_id].append(
                    InstanceSnapshot(
                        sop_instance_uid=sop_instance_uid,
                        sop_class_uid=sop_class_uid,
                        instance_number=instance_number,
                        image_laterality=laterality,
                        title=title,
                    )
                )
            series_snapshots = [
                SeriesSnapshot(
                    attributes=SeriesAttributes(
                        series_uid=row.series_uid, **{name: getattr(row, name) for name in SERIES_FIELDS}
                    ),
                    instances=tuple(sorted(instances_by_series[row.id], key=_instance_order)),
                )
                for row in series_rows
            ]
            series_snapshots.sort(key=_series_order)
            withdrawal = None
            if not instances_by_series:  # only rejection notes leave a study row without instances
                withdrawal = read_withdrawal(connection, study_uid)
            return StudySnapshot(
                attributes=attributes,
                series=tuple(series_snapshots),
                change_seq=study.change_seq,
                published_hash=study.published_hash,
                withdrawal=withdrawal,
            )


def _series_order(series: SeriesSnapshot) -> tuple[bool, int, str]:
    number = series.attributes.series_number
    return (number is None, number or 0, series.attributes.series_uid)


def _instance_order(instance: InstanceSnapshot) -> tuple[bool, int, str]:
    number = instance.instance_number
    return (number is None, number or 0, instance.sop_instance_uid)
