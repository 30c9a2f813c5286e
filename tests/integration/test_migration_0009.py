"""Revision 0009 on SQLite and PostgreSQL: a study indexed before it keeps its reasons (each code and each text
its own reason, as they were sent until then) and gets empty accession issuers; downgrade gives the old columns
back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.records import CodedConcept, RequestedReason
from tests.conftest import MAX_DELAY, QUIET
from tests.support.schema import alembic_downgrade, alembic_upgrade

COUGH = CodedConcept(code="49727002", scheme="SCT", meaning="Cough")


@pytest.fixture
def engine_at_0008(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    alembic_upgrade(engine, "0008")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO studies (study_uid, patient_id, issuer_of_patient_id, accession_number, study_date, "
                "study_time, timezone_offset, study_description, change_seq, publish_state, attempts, reasons, "
                "reason_codes) VALUES ('1.2.3', 'P', '', 'A', '', '', '', '', 1, 'published', 0, "
                """'["Persistent cough", "Fièvre"]', '[["49727002", "SCT", "Cough", ""]]')"""
            )
        )
        connection.execute(
            text(
                "INSERT INTO studies (study_uid, patient_id, issuer_of_patient_id, accession_number, study_date, "
                "study_time, timezone_offset, study_description, change_seq, publish_state, attempts) "
                "VALUES ('1.2.4', 'P', '', 'A', '', '', '', '', 1, 'published', 0)"
            )
        )
    yield engine
    engine.dispose()


def test_existing_reasons_and_codes_become_one_reason_each(engine_at_0008: Engine) -> None:
    alembic_upgrade(engine_at_0008, "0009")

    index = Index(engine_at_0008, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    migrated = index.load_snapshot("1.2.3").attributes
    untouched = index.load_snapshot("1.2.4").attributes

    assert migrated.reasons == (
        RequestedReason(codes=(COUGH,)),
        RequestedReason(text="Persistent cough"),
        RequestedReason(text="Fièvre"),
    )
    assert (migrated.accession_issuer_local_id, migrated.accession_issuer_universal_id) == ("", "")
    assert untouched.reasons == ()


def test_downgrade_restores_texts_and_codes_apart(engine_at_0008: Engine) -> None:
    alembic_upgrade(engine_at_0008, "0009")
    alembic_downgrade(engine_at_0008, "0008")

    with engine_at_0008.connect() as connection:
        row = connection.execute(text("SELECT reasons, reason_codes FROM studies WHERE study_uid = '1.2.3'")).one()
    assert row.reasons == '["Persistent cough", "Fièvre"]'
    assert row.reason_codes == '[["49727002", "SCT", "Cough", ""]]'
