"""DriverStatement, the ingest's seam between SQLAlchemy and the database driver: every statement shape the ingest
runs on the driver's cursor writes and reads the same rows as ``Connection.execute`` would, on SQLite and
PostgreSQL; a compiler without what it reads is refused when the statement is built."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

from pacs_bridge.index.driver_statement import DriverStatement
from pacs_bridge.index.statements import (
    INSTANCE_FIELDS,
    INSTANCES,
    SERIES,
    SERIES_FIELDS,
    STUDIES,
    STUDY_FIELDS,
    IngestStatements,
)
from pacs_bridge.records import CodedConcept, RequestedReason
from tests.support.studies import uid

CHANGED_AT = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)

STUDY = {
    "patient_id": "PAT-1",
    "issuer_of_patient_id": "HOSP-A",
    "patient_name": "Doe^Jane",
    "patient_birth_date": "19700101",
    "patient_sex": "F",
    "accession_number": "ACC-1",
    "study_date": "20260304",
    "study_time": "050607",
    "study_description": "CT chest",
    "referring_physician": "Who^Doctor",
    "reading_physicians": ("Reader^One", "Reader^Two"),
    "procedure_codes": (CodedConcept(code="CTCHEST", scheme="99LOCAL", meaning="CT chest"),),
    "reasons": (RequestedReason(text="cough", codes=(CodedConcept(code="49727002", scheme="SCT"),)),),
}
SERIES_VALUES = {
    "modality": "CT",
    "series_number": 3,
    "series_description": "axial",
    "body_part_examined": "CHEST",
    "performing_physicians": ("Tech^Nician",),
    "operators": (),
    "sending_ae_title": "MODALITY1",
}
INSTANCE = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "instance_number": 7, "image_laterality": "R", "title": ""}


def statements_for(engine: Engine) -> IngestStatements:
    postgres = engine.dialect.name == "postgresql"
    return IngestStatements(postgresql.insert if postgres else sqlite.insert, postgres=postgres)


def cursor_of(connection: Connection) -> Any:
    return connection.connection.driver_connection.cursor()  # type: ignore[union-attr]


def row_without(connection: Connection, table: Table, key: str, value: Any, *left_out: str) -> dict[str, Any]:
    row = connection.execute(select(table).where(table.c[key] == value)).mappings().one()
    return {name: row[name] for name in row if name not in ("id", key, *left_out)}


def study_changes() -> dict[str, Any]:
    return {
        **{name: STUDY.get(name, "") for name in STUDY_FIELDS},
        "change_seq": 1,
        "first_change_at": CHANGED_AT,
        "last_change_at": CHANGED_AT,
        "publish_state": "pending",
        "due_at": CHANGED_AT,
    }


def test_the_hot_path_writes_the_rows_connection_execute_writes(engine: Engine) -> None:
    statements = statements_for(engine)
    dialect = engine.dialect
    through_driver, through_sqlalchemy = uid("1"), uid("2")
    with engine.begin() as connection:
        cursor = cursor_of(connection)
        DriverStatement(statements.insert_study, dialect, ["study_uid"]).execute(cursor, {"study_uid": through_driver})
        connection.execute(statements.insert_study, {"study_uid": through_sqlalchemy})
        ids = dict(connection.execute(select(STUDIES.c.study_uid, STUDIES.c.id)).all())

        changes = study_changes()
        update = DriverStatement(statements.update_study, dialect, sorted(changes))
        update.execute(cursor, {"_id": ids[through_driver], **changes})
        connection.execute(statements.update_study, {"_id": ids[through_sqlalchemy], **changes})

        series_values = {name: SERIES_VALUES.get(name, "") for name in SERIES_FIELDS}
        insert_series = DriverStatement(statements.insert_series, dialect, ["study_id", "series_uid", *SERIES_FIELDS])
        insert_series.execute(cursor, {"study_id": ids[through_driver], "series_uid": uid("1.1"), **series_values})
        connection.execute(
            statements.insert_series, {"study_id": ids[through_sqlalchemy], "series_uid": uid("2.1"), **series_values}
        )
        series_ids = dict(connection.execute(select(SERIES.c.series_uid, SERIES.c.id)).all())

        instance_values = {
            "received_at": CHANGED_AT,
            **{name: INSTANCE.get(name, "") for name in INSTANCE_FIELDS if name != "sop_instance_uid"},
        }
        insert_instance = DriverStatement(
            statements.insert_instance, dialect, ["series_id", "received_at", *INSTANCE_FIELDS]
        )
        inserted = insert_instance.first(
            cursor, {"series_id": series_ids[uid("1.1")], "sop_instance_uid": uid("1.1.1"), **instance_values}
        )
        connection.execute(
            statements.insert_instance,
            {"series_id": series_ids[uid("2.1")], "sop_instance_uid": uid("2.1.1"), **instance_values},
        )
        assert inserted is not None and inserted.id > 0  # RETURNING through the driver
        assert (
            insert_instance.first(  # a conflict returns no row, as RETURNING does through SQLAlchemy
                cursor, {"series_id": series_ids[uid("1.1")], "sop_instance_uid": uid("1.1.1"), **instance_values}
            )
            is None
        )

        assert row_without(connection, STUDIES, "study_uid", through_driver) == row_without(
            connection, STUDIES, "study_uid", through_sqlalchemy
        )
        assert row_without(connection, SERIES, "series_uid", uid("1.1"), "study_id") == row_without(
            connection, SERIES, "series_uid", uid("2.1"), "study_id"
        )
        assert row_without(connection, INSTANCES, "sop_instance_uid", uid("1.1.1"), "series_id") == row_without(
            connection, INSTANCES, "sop_instance_uid", uid("2.1.1"), "series_id"
        )


def test_the_hot_path_reads_the_rows_connection_execute_reads(engine: Engine) -> None:
    """Two studies read in turn: a row's decoded values are reused only while its raw values stay the same."""
    statements = statements_for(engine)
    dialect = engine.dialect
    with engine.begin() as connection:
        cursor = cursor_of(connection)
        for number, description in (("1", "CT chest"), ("2", "CT head")):
            connection.execute(statements.insert_study, {"study_uid": uid(number)})
            study_id = connection.execute(select(STUDIES.c.id).where(STUDIES.c.study_uid == uid(number))).scalar()
            changes = {**study_changes(), "study_description": description}
            connection.execute(statements.update_study, {"_id": study_id, **changes})
            series_values = {name: SERIES_VALUES.get(name, "") for name in SERIES_FIELDS}
            connection.execute(
                statements.insert_series, {"study_id": study_id, "series_uid": uid(f"{number}.1"), **series_values}
            )
        series_id = connection.execute(select(SERIES.c.id).where(SERIES.c.series_uid == uid("1.1"))).scalar()
        connection.execute(
            statements.insert_instance,
            {
                "series_id": series_id,
                "received_at": CHANGED_AT,
                "sop_instance_uid": uid("1.1.1"),
                **{name: INSTANCE.get(name, "") for name in INSTANCE_FIELDS if name != "sop_instance_uid"},
            },
        )

        reads = [
            (statements.lock_study, {"uid": uid("1")}),
            (statements.lock_study, {"uid": uid("2")}),
            (statements.lock_study, {"uid": uid("1")}),
            (statements.select_series, {"uid": uid("1.1"), "sop_uid": uid("1.1.1")}),
            (statements.select_series, {"uid": uid("2.1"), "sop_uid": uid("2.1.9")}),
            (statements.select_instance, {"uid": uid("1.1.1")}),
            (statements.lock_study, {"uid": uid("9")}),
        ]
        driver = {id(statement): DriverStatement(statement, dialect) for statement, _ in reads}
        for statement, parameters in reads:
            expected = connection.execute(statement, parameters).first()
            found = driver[id(statement)].first(cursor, parameters)
            if expected is None:
                assert found is None
                continue
            assert found._fields == tuple(expected._fields)
            assert tuple(found) == tuple(expected)
        assert driver[id(statements.lock_study)].first(cursor, {"uid": uid("2")}).reading_physicians == (
            "Reader^One",
            "Reader^Two",
        )


@pytest.mark.postgresql
def test_the_postgresql_one_statement_insert_writes_what_the_two_statements_write(postgres_schema_url: str) -> None:
    from pacs_bridge.index.engine import make_engine
    from pacs_bridge.index.schema import prepare_schema

    engine = make_engine(postgres_schema_url)
    try:
        prepare_schema(engine)
        statements = statements_for(engine)
        assert statements.record_into_known_series is not None
        with engine.begin() as connection:
            connection.execute(statements.insert_study, {"study_uid": uid("1")})
            study_id = connection.execute(select(STUDIES.c.id)).scalar()
            series_values = {name: SERIES_VALUES.get(name, "") for name in SERIES_FIELDS}
            connection.execute(
                statements.insert_series, {"study_id": study_id, "series_uid": uid("1.1"), **series_values}
            )
            changes = study_changes()
            record = DriverStatement(statements.record_into_known_series, engine.dialect, sorted(["_id", *changes]))
            values = {
                "series_uid": uid("1.1"),
                "study_id": study_id,
                "received_at": CHANGED_AT,
                **{f"series_{name}": value for name, value in series_values.items()},
                **{name: INSTANCE.get(name, "") for name in INSTANCE_FIELDS},
                "sop_instance_uid": uid("1.1.1"),
                "_id": study_id,
                **changes,
            }
            assert record.first(cursor_of(connection), values) is not None
            instance = row_without(connection, INSTANCES, "sop_instance_uid", uid("1.1.1"), "series_id")
            assert instance == {"received_at": CHANGED_AT, **INSTANCE}
            study = row_without(connection, STUDIES, "study_uid", uid("1"))
            assert {name: study[name] for name in changes} == changes
    finally:
        engine.dispose()


def test_a_statement_the_compiler_cannot_describe_is_refused_when_built() -> None:
    with pytest.raises(TypeError, match="positiontup, binds, insert_prefetch"):
        DriverStatement(CreateTable(STUDIES), sqlite.dialect())
