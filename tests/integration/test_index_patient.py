"""The index keeps the patient's name, birth date and sex (for patient.mode create), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from pacs_bridge.index.repository import Index
from pacs_bridge.records import InstanceRecord, RecordOutcome, SeriesAttributes, StudyAttributes
from tests.conftest import FakeClock
from tests.support.studies import uid


def record(instance: int, **patient: Any) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid("1"), patient_id="PAT-1", **patient),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT"),
        sop_instance_uid=uid(f"1.1.{instance}"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


def demographics(index: Index) -> tuple[str, str, str]:
    study = index.load_snapshot(uid("1")).attributes
    return study.patient_name, study.patient_birth_date, study.patient_sex


def test_patient_demographics_are_kept_and_not_erased_by_an_instance_without_them(
    index: Index, clock: FakeClock
) -> None:
    """Stored as received (UTF-8 name intact); a later instance that leaves them empty (a dose report made by
    another system) keeps them; a different stated value replaces them."""
    index.record_instance(
        record(1, patient_name="Müller^Jürgen=山田^太郎", patient_birth_date="19600229", patient_sex="M"),
        received_at=clock(),
    )
    assert demographics(index) == ("Müller^Jürgen=山田^太郎", "19600229", "M")

    assert index.record_instance(record(2), received_at=clock()) == RecordOutcome.NEW
    assert demographics(index) == ("Müller^Jürgen=山田^太郎", "19600229", "M")

    index.record_instance(record(3, patient_name="Müller^Jürgen", patient_sex="O"), received_at=clock())
    assert demographics(index) == ("Müller^Jürgen", "19600229", "O")
