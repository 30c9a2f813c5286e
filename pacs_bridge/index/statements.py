"""The index's Core statements, built once: those of the ingest hot path (some of which the rejection notes
run too) and those of ``load_snapshot`` and ``load_snapshots``, with the tables and the record fields they write."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, cast

from sqlalchemy import Table, bindparam, exists, func, select, update
from sqlalchemy import cast as sql_cast

from pacs_bridge.index.driver_statement import DriverStatement
from pacs_bridge.index.models import Instance, RejectedInstance, Series, Study
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes

STUDY_FIELDS = tuple(f.name for f in fields(StudyAttributes) if f.name != "study_uid")
SERIES_FIELDS = tuple(f.name for f in fields(SeriesAttributes) if f.name != "series_uid")
INSTANCE_FIELDS = tuple(f.name for f in fields(InstanceRecord) if f.name not in ("study", "series", "rejection_note"))

STUDIES = cast(Table, Study.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)
REJECTED = cast(Table, RejectedInstance.__table__)


class IngestStatements:
    """The hot path's statements, built once (SQLAlchemy caches their compiled form)."""

    def __init__(self, insert: Any, *, postgres: bool) -> None:
        study_columns = (
            STUDIES.c.id,
            STUDIES.c.study_uid,
            STUDIES.c.change_seq,
            STUDIES.c.publish_state,
            STUDIES.c.first_change_at,
            *(STUDIES.c[name] for name in STUDY_FIELDS),
        )
        self.lock_study = select(*study_columns).where(STUDIES.c.study_uid == bindparam("uid")).with_for_update()
        self.lock_studies_by_id = (
            select(*study_columns)
            .where(STUDIES.c.id.in_(bindparam("ids", expanding=True)))
            .order_by(STUDIES.c.study_uid)
            .with_for_update()
        )
        # The rejected-instance check rides on this statement (no extra round trip per instance); it runs after
        # the study lock is held, so on PostgreSQL it sees a rejection note committed while we waited for it.
        self.select_series = select(
            SERIES.c.id,
            SERIES.c.study_id,
            *(SERIES.c[name] for name in SERIES_FIELDS),
            select(REJECTED.c.id)
            .where(REJECTED.c.sop_instance_uid == bindparam("sop_uid"))
            .scalar_subquery()
            .label("rejected_id"),
        ).where(SERIES.c.series_uid == bindparam("uid"))
        self.select_instance = select(
            INSTANCES.c.id, INSTANCES.c.series_id, *(INSTANCES.c[name] for name in INSTANCE_FIELDS)
        ).where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
        # INSERT ... ON CONFLICT DO NOTHING: a concurrent association may have inserted the same key.
        self.insert_study = insert(STUDIES).on_conflict_do_nothing()
        self.create_study = insert(STUDIES).on_conflict_do_nothing().returning(STUDIES.c.id)
        self.insert_rejected = insert(REJECTED).on_conflict_do_nothing()
        self.insert_series = insert(SERIES).on_conflict_do_nothing()
        # RETURNING tells a new row from a conflict on both backends (rowcount does not, on psycopg).
        self.insert_instance = insert(INSTANCES).on_conflict_do_nothing().returning(INSTANCES.c.id)
        # On SQLite a statement is a call into the library, and this one's many bound values cost more than the
        # statement it saves (callgrind: 602k -> 660k instructions per instance); on PostgreSQL it saves a round trip.
        self.insert_into_known_series = self._insert_into_known_series(insert) if postgres else None
        self.update_study = update(STUDIES).where(STUDIES.c.id == bindparam("_id"))
        # PostgreSQL: that insert and the study's update in one statement; the study row changes only when the
        # instance was inserted (a data-modifying CTE runs once, whether read or not).
        self.record_into_known_series = None
        if self.insert_into_known_series is not None:
            inserted = self.insert_into_known_series.cte("inserted_instance")
            self.record_into_known_series = (
                self.update_study.where(exists(select(inserted.c.id))).add_cte(inserted).returning(STUDIES.c.id)
            )

    @staticmethod
    def _insert_into_known_series(insert: Any) -> Any:
        """The usual C-STORE in one statement (PostgreSQL) instead of two round trips: insert the instance into
        its series when that series exists in this study, states exactly the record's series attributes, and the
        instance was not rejected. It returns the new row's id; nothing when any of that does not hold (or the
        instance is indexed already), and the instance then takes the full path (read the series, compare,
        insert). It runs after the study's lock is held, so it sees a rejection note committed meanwhile.

        PostgreSQL types a bound value in a select list on its own (a NULL as text, which it will not assign to
        an integer column), so the inserted values are cast to their columns' types.
        """

        def value(name: str, type_: Any) -> Any:
            return sql_cast(bindparam(name, type_=type_), type_)

        inserted = select(
            SERIES.c.id,
            value("received_at", INSTANCES.c.received_at.type),
            *(value(name, INSTANCES.c[name].type) for name in INSTANCE_FIELDS),
        ).where(
            SERIES.c.series_uid == bindparam("series_uid"),
            SERIES.c.study_id == bindparam("study_id"),
            *(
                SERIES.c[name].is_not_distinct_from(bindparam(f"series_{name}", type_=SERIES.c[name].type))
                for name in SERIES_FIELDS
            ),
            ~exists().where(REJECTED.c.sop_instance_uid == bindparam("sop_instance_uid")),
        )
        return (
            insert(INSTANCES)
            .from_select(["series_id", "received_at", *INSTANCE_FIELDS], inserted)
            .on_conflict_do_nothing()
            .returning(INSTANCES.c.id)
        )


def _snapshot_study_columns() -> tuple[Any, ...]:
    """A study's columns as both snapshot reads select them."""
    return (
        STUDIES.c.id,
        STUDIES.c.study_uid,
        STUDIES.c.change_seq,
        STUDIES.c.published_hash,
        *(STUDIES.c[name] for name in STUDY_FIELDS),
    )


def _snapshot_instance_columns() -> tuple[Any, ...]:
    """An instance's columns as both snapshot reads select them (``snapshot._instances_by_series`` unpacks them)."""
    return (
        INSTANCES.c.series_id,
        INSTANCES.c.sop_instance_uid,
        INSTANCES.c.sop_class_uid,
        INSTANCES.c.instance_number,
        INSTANCES.c.image_laterality,
        INSTANCES.c.title,
    )


class SnapshotStatements:
    """The queries of ``Index.load_snapshot``, built once."""

    def __init__(self) -> None:
        self.study = select(*_snapshot_study_columns()).where(STUDIES.c.study_uid == bindparam("uid"))
        self.series = select(SERIES.c.id, SERIES.c.series_uid, *(SERIES.c[name] for name in SERIES_FIELDS)).where(
            SERIES.c.study_id == bindparam("study_id")
        )
        self.instances = (
            select(*_snapshot_instance_columns())
            .join(SERIES, SERIES.c.id == INSTANCES.c.series_id)
            .where(SERIES.c.study_id == bindparam("study_id"))
        )


class BatchSnapshotStatements:
    """The queries of ``SnapshotReader.load_snapshots`` (a batch's studies at once), built once."""

    def __init__(self) -> None:
        self.studies = select(*_snapshot_study_columns()).where(
            STUDIES.c.study_uid.in_(bindparam("uids", expanding=True))
        )
        # Each series with its instance count, which decides whether its study fits in the batch's read.
        instances = (
            select(func.count())
            .select_from(INSTANCES)
            .where(INSTANCES.c.series_id == SERIES.c.id)
            .scalar_subquery()
            .label("instances")
        )
        self.series = select(
            SERIES.c.id, SERIES.c.study_id, SERIES.c.series_uid, *(SERIES.c[name] for name in SERIES_FIELDS), instances
        ).where(SERIES.c.study_id.in_(bindparam("study_ids", expanding=True)))
        self.instances = select(*_snapshot_instance_columns()).where(
            INSTANCES.c.series_id.in_(bindparam("series_ids", expanding=True))
        )


class DriverIngest:
    """The hot path's statements as ``DriverStatement``s for one dialect."""

    def __init__(self, statements: IngestStatements, dialect: Any) -> None:
        self._dialect = dialect
        self._update_study_statement = statements.update_study
        self.lock_study = DriverStatement(statements.lock_study, dialect)
        self.insert_study = DriverStatement(statements.insert_study, dialect, ["study_uid"])
        self.select_series = DriverStatement(statements.select_series, dialect)
        self.insert_series = DriverStatement(
            statements.insert_series, dialect, ["study_id", "series_uid", *SERIES_FIELDS]
        )
        self.insert_instance = DriverStatement(
            statements.insert_instance, dialect, ["series_id", "received_at", *INSTANCE_FIELDS]
        )
        self.select_instance = DriverStatement(statements.select_instance, dialect)
        self._record_into_known_series_statement = statements.record_into_known_series
        self._study_updates: dict[frozenset[str], DriverStatement] = {}
        self._records_into_known_series: dict[frozenset[str], DriverStatement] = {}

    @property
    def records_into_known_series(self) -> bool:
        """Whether ``record_into_known_series`` is there (PostgreSQL)."""
        return self._record_into_known_series_statement is not None

    def update_study(self, values: dict[str, Any]) -> DriverStatement:
        """The study update setting the columns of ``values`` (its ``_id`` names the row); one per set of
        columns, compiled on first use."""
        return self._by_columns(self._study_updates, self._update_study_statement, values)

    def record_into_known_series(self, study_values: dict[str, Any]) -> DriverStatement:
        """The instance insert into its known series with the study update setting the columns of
        ``study_values`` (``IngestStatements.record_into_known_series``); PostgreSQL only."""
        return self._by_columns(self._records_into_known_series, self._record_into_known_series_statement, study_values)

    def _by_columns(
        self, cache: dict[frozenset[str], DriverStatement], statement: Any, values: dict[str, Any]
    ) -> DriverStatement:
        columns = frozenset(values)
        compiled = cache.get(columns)
        if compiled is None:
            compiled = DriverStatement(statement, self._dialect, sorted(columns))
            cache[columns] = compiled
        return compiled
