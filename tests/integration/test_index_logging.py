"""The index at ``logging.level: debug`` logs no patient data: SQLAlchemy's statements show no parameters and no
rows, and a database error's text carries no values (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
import structlog
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.errors import UnstorableValueError
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.logs import configure_logging
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.support.studies import uid

MARKED = StudyAttributes(
    study_uid=uid("1"),
    patient_id="PHI-MARK-7731",
    patient_name="Zebra^Quokka",
    patient_birth_date="19370512",
    accession_number="ACC-MARK-5521",
)
MARKERS = ("PHI-MARK", "Zebra", "Quokka", "19370512", "ACC-MARK")


@pytest.fixture
def debug_logging() -> Iterator[io.StringIO]:
    """The bridge's logging at debug level, its JSON lines written to the buffer yielded (not to stdout, which
    pytest swaps between a test's phases); the previous set-up afterwards."""
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    configure_logging("debug", "json")
    output = io.StringIO()
    cast(logging.StreamHandler[Any], root.handlers[0]).setStream(output)
    yield output
    structlog.configure(**structlog_config)
    root.handlers[:], root.level = root_handlers, root_level


def marked(study: StudyAttributes = MARKED, number: str = "1") -> InstanceRecord:
    return InstanceRecord(
        study=study,
        series=SeriesAttributes(series_uid=uid(f"{number}.1"), modality="CT"),
        sop_instance_uid=uid(f"{number}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def test_recording_and_reading_a_marked_study_at_debug_logs_statements_but_no_patient_data(
    debug_logging: io.StringIO, index: Index, clock: FakeClock
) -> None:
    """Record the study (the per-instance path), change it (the ORM path), claim and read it back: SQLAlchemy
    speaks (statements), but no line holds a marked value."""
    index.record_instance(marked(), received_at=clock())
    index.record_instance(marked(), received_at=clock())  # unchanged: read and compared
    clock.advance(QUIET)
    index.claim_due_studies(clock(), limit=1, lease=QUIET, claimer="test")
    assert index.load_snapshot(uid("1")).attributes.patient_id == "PHI-MARK-7731"

    output = debug_logging.getvalue()
    assert '"logger": "sqlalchemy.engine.Engine"' in output  # the engine does log at debug level
    assert not [marker for marker in MARKERS if marker in output]


@pytest.mark.postgresql
def test_a_database_error_carries_no_statement_parameters(postgres_schema_url: str, clock: FakeClock) -> None:
    """PostgreSQL refuses a value: neither our error nor SQLAlchemy's (its cause, in any logged traceback) quotes
    the statement's parameters."""
    engine = make_engine(postgres_schema_url)
    prepare_schema(engine)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    index.record_instance(marked(), received_at=clock())
    poisoned = StudyAttributes(study_uid=uid("1"), patient_id="PHI-MARK-7731", patient_name="Zebra^Quokka\x00")
    try:
        with pytest.raises(UnstorableValueError) as refused:
            index.record_instance(marked(poisoned), received_at=clock())
    finally:
        engine.dispose()
    texts = [str(refused.value), str(refused.value.__cause__)]
    assert not [marker for marker in MARKERS for text in texts if marker in text]


def test_the_engine_never_shows_statement_parameters_in_its_lines_or_its_errors(
    debug_logging: io.StringIO, engine: Engine
) -> None:
    """Whatever statement a future change runs through SQLAlchemy with patient data as a parameter: its log line
    and, when it fails, its error text show no parameter (``make_engine`` hides them)."""
    with engine.connect() as connection:
        assert connection.execute(text("SELECT :name"), {"name": "Zebra^Quokka"}).scalar_one() == "Zebra^Quokka"
        with pytest.raises(DBAPIError) as failed:
            connection.execute(text("SELECT * FROM no_such_table WHERE name = :name"), {"name": "Zebra^Quokka"})

    assert "FROM no_such_table WHERE name = " in debug_logging.getvalue()  # the statements are logged
    assert "Zebra" not in debug_logging.getvalue()
    assert "Zebra" not in str(failed.value)
