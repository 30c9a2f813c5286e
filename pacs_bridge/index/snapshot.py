"""Studies' snapshots: everything indexed for them, read for the publisher.

Snapshots are read with plain column queries and assembled and sorted in Python: no per-instance ORM objects,
and the same order (hence the same content hash) on SQLite and PostgreSQL whatever their collation.

``load_snapshot`` reads one study in one transaction; ``load_snapshots`` reads a claimed batch's studies in one
transaction with three statements whatever the batch's size, up to an instance budget: on PostgreSQL each
transaction costs a connection checkout (with its ping), BEGIN and COMMIT, each statement a round trip, and for
a small study those cost more than building its resource.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from pacs_bridge.errors import UnknownStudyError
from pacs_bridge.index.database import IndexDatabase, chunks
from pacs_bridge.index.rejection_notes import withdrawal as read_withdrawal
from pacs_bridge.index.statements import SERIES_FIELDS, STUDY_FIELDS, BatchSnapshotStatements, SnapshotStatements
from pacs_bridge.records import InstanceSnapshot, SeriesAttributes, SeriesSnapshot, StudyAttributes, StudySnapshot

# Instances a batch read holds at most (``load_snapshots``' default budget): the small studies of a batch come
# together, a large study is read on its own when its turn comes, so a batch never holds more than this many.
BATCH_READ_INSTANCES = 4096


class SnapshotReader:
    """Reads studies' snapshots with statements built once."""

    def __init__(self, db: IndexDatabase) -> None:
        self._db = db
        self._snapshot_statements = SnapshotStatements()
        self._batch_statements = BatchSnapshotStatements()

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
            series_rows = connection.execute(statements.series, {"study_id": study.id}).all()
            instances_by_series = _instances_by_series(connection.execute(statements.instances, {"study_id": study.id}))
            return _snapshot(connection, study, series_rows, instances_by_series)

    def load_snapshots(
        self, study_uids: Sequence[str], *, instance_budget: int = BATCH_READ_INSTANCES
    ) -> dict[str, StudySnapshot]:
        """The snapshots of ``study_uids`` (a claimed batch), read in one transaction, as ``load_snapshot`` reads
        one: the studies, their series with each one's instance count, then the instances of the studies taken.

        Studies are taken in the order given while their instances fit in ``instance_budget`` (one larger than
        the whole budget is taken when it comes first); those not taken, and studies not in the index, are left
        out of the answer: the caller reads them with ``load_snapshot``, which says when one is unknown.
        """
        if not study_uids:
            return {}
        statements = self._batch_statements
        with self._db.translated_errors(), self._db.read_engine.begin() as connection:
            studies = {
                row.study_uid: row
                for chunk in chunks(study_uids)
                for row in connection.execute(statements.studies, {"uids": list(chunk)})
            }
            series_by_study: dict[int, list[Any]] = defaultdict(list)
            for chunk in chunks([row.id for row in studies.values()]):
                for row in connection.execute(statements.series, {"study_ids": list(chunk)}):
                    series_by_study[row.study_id].append(row)
            taken: list[Any] = []
            spent = 0
            for study_uid in study_uids:
                study = studies.get(study_uid)
                if study is None:
                    continue
                instances = sum(row.instances for row in series_by_study[study.id])
                if taken and spent + instances > instance_budget:
                    continue
                taken.append(study)
                spent += instances
            series_ids = [row.id for study in taken for row in series_by_study[study.id]]
            instances_by_series: dict[int, list[InstanceSnapshot]] = defaultdict(list)
            for chunk in chunks(series_ids):
                rows = connection.execute(statements.instances, {"series_ids": list(chunk)})
                for series_id, instances in _instances_by_series(rows).items():
                    instances_by_series[series_id].extend(instances)
            return {
                study.study_uid: _snapshot(connection, study, series_by_study[study.id], instances_by_series)
                for study in taken
            }


def _instances_by_series(rows: Iterable[Any]) -> dict[int, list[InstanceSnapshot]]:
    instances_by_series: dict[int, list[InstanceSnapshot]] = defaultdict(list)
    for series_id, sop_instance_uid, sop_class_uid, instance_number, laterality, title in rows:
        instances_by_series[series_id].append(
            InstanceSnapshot(
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                instance_number=instance_number,
                image_laterality=laterality,
                title=title,
            )
        )
    return instances_by_series


def _snapshot(
    connection: Connection,
    study: Any,
    series_rows: Sequence[Any],
    instances_by_series: dict[int, list[InstanceSnapshot]],
) -> StudySnapshot:
    """One study's snapshot from its rows (read in the transaction of ``connection``)."""
    series_snapshots = [
        SeriesSnapshot(
            attributes=SeriesAttributes(
                series_uid=row.series_uid, **{name: getattr(row, name) for name in SERIES_FIELDS}
            ),
            instances=tuple(sorted(instances_by_series.get(row.id, ()), key=_instance_order)),
        )
        for row in series_rows
    ]
    series_snapshots.sort(key=_series_order)
    withdrawal = None
    if not any(series.instances for series in series_snapshots):  # only rejection notes leave a study without any
        withdrawal = read_withdrawal(connection, study.study_uid)
    return StudySnapshot(
        attributes=StudyAttributes(study_uid=study.study_uid, **{name: getattr(study, name) for name in STUDY_FIELDS}),
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
