"""The index keeps what the FHIR mapping needs, on SQLite and PostgreSQL: names, codes, body part,
laterality, performers and instance titles survive the round trip exactly, in any script."""

from __future__ import annotations

from dataclasses import replace

from pacs_bridge.index.repository import Index
from pacs_bridge.records import (
    CodedConcept,
    InstanceRecord,
    InstanceSnapshot,
    RecordOutcome,
    RequestedReason,
    SeriesAttributes,
    StudyAttributes,
)
from tests.conftest import FakeClock
from tests.support.studies import uid

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.67"

STUDY = StudyAttributes(
    study_uid=uid("40"),
    patient_id="PAT-40",
    referring_physician="Yamada^Tarou=山田^太郎=やまだ^たろう",
    reading_physicians=("Müller^Zoë", "Doe^Jane"),
    procedure_codes=(
        CodedConcept(code="24627-2", scheme="LN", meaning="CT Chest"),
        CodedConcept(code="X1", scheme="99LOCAL", meaning='Local, with "quotes" and a comma', scheme_version="2"),
    ),
    reasons=(
        RequestedReason(text="Persistent cough", codes=(CodedConcept(code="49727002", scheme="SCT", meaning="Cough"),)),
        RequestedReason(text="Follow-up, «rappel»"),
    ),
)
SERIES = SeriesAttributes(
    series_uid=uid("40.1"),
    modality="SR",
    series_number=1,
    body_part_examined="CHEST",
    laterality="L",
    performing_physicians=("Wilson^James",),
    operators=("Tech^Tom", "Tech^Tina"),
)
RECORD = InstanceRecord(
    study=STUDY,
    series=SERIES,
    sop_instance_uid=uid("40.1.1"),
    sop_class_uid=SR_STORAGE,
    instance_number=1,
    image_laterality="L",
    title="X-Ray Radiation Dose Report",
)


def test_mapping_attributes_survive_the_index_round_trip(index: Index, clock: FakeClock) -> None:
    """What extract gives is what load_snapshot returns, tuples and coded entries included."""
    index.record_instance(RECORD, received_at=clock())

    snapshot = index.load_snapshot(STUDY.study_uid)

    assert snapshot.attributes == STUDY
    assert snapshot.series[0].attributes == SERIES
    assert snapshot.series[0].instances == (
        InstanceSnapshot(
            sop_instance_uid=RECORD.sop_instance_uid,
            sop_class_uid=SR_STORAGE,
            instance_number=1,
            image_laterality="L",
            title="X-Ray Radiation Dose Report",
        ),
    )


def test_identical_resend_with_mapping_attributes_is_unchanged(index: Index, clock: FakeClock) -> None:
    """Tuples and codes compare equal after the round trip, so a re-send changes nothing."""
    index.record_instance(RECORD, received_at=clock())

    assert index.record_instance(RECORD, received_at=clock()) is RecordOutcome.UNCHANGED


def test_changed_code_or_title_is_an_update(index: Index, clock: FakeClock) -> None:
    """A new procedure code (study) or a new title (instance) is a change to publish."""
    index.record_instance(RECORD, received_at=clock())
    new_code = replace(RECORD, study=replace(STUDY, procedure_codes=STUDY.procedure_codes[:1]))

    assert index.record_instance(new_code, received_at=clock()) is RecordOutcome.UPDATED
    assert index.record_instance(replace(new_code, title="Other"), received_at=clock()) is RecordOutcome.UPDATED
    assert index.load_snapshot(STUDY.study_uid).attributes.procedure_codes == STUDY.procedure_codes[:1]


def test_instance_without_mapping_attributes_loads_empty_defaults(index: Index, clock: FakeClock) -> None:
    """Records that set none of the new attributes (older callers) load the empty defaults."""
    bare = InstanceRecord(
        study=StudyAttributes(study_uid=uid("41")),
        series=SeriesAttributes(series_uid=uid("41.1"), modality="CT"),
        sop_instance_uid=uid("41.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    index.record_instance(bare, received_at=clock())

    snapshot = index.load_snapshot(uid("41"))

    assert snapshot.attributes == bare.study
    assert snapshot.series[0].attributes == bare.series


def test_later_instance_without_order_codes_or_names_does_not_erase_them(index: Index, clock: FakeClock) -> None:
    """A presentation state made later by a viewer, without the order's codes and names, keeps the study's."""
    index.record_instance(RECORD, received_at=clock())
    viewer_state = InstanceRecord(
        study=StudyAttributes(study_uid=STUDY.study_uid, patient_id="PAT-40"),
        series=SeriesAttributes(series_uid=uid("40.9"), modality="PR", series_number=9),
        sop_instance_uid=uid("40.9.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.11.1",
        title="ANNOTATIONS",
    )

    assert index.record_instance(viewer_state, received_at=clock()) is RecordOutcome.NEW
    assert index.load_snapshot(STUDY.study_uid).attributes == STUDY


def test_a_different_referring_physician_still_replaces_the_old_one(index: Index, clock: FakeClock) -> None:
    """Only an empty value is ignored; a corrected name is a change."""
    index.record_instance(RECORD, received_at=clock())
    corrected = replace(RECORD, study=replace(STUDY, referring_physician="Doe^John"))

    assert index.record_instance(corrected, received_at=clock()) is RecordOutcome.UPDATED
    assert index.load_snapshot(STUDY.study_uid).attributes.referring_physician == "Doe^John"


def sent_by(ae_title: str, sop_suffix: str) -> InstanceRecord:
    """RECORD's series, another instance of it, arriving on an association from ``ae_title``."""
    return replace(
        RECORD, series=replace(SERIES, sending_ae_title=ae_title), sop_instance_uid=uid(f"40.1.{sop_suffix}")
    )


def test_the_series_keeps_the_calling_ae_that_first_sent_it(index: Index, clock: FakeClock) -> None:
    """A later instance of the series from another AE (a PACS forwarding it) does not move its sender."""
    index.record_instance(sent_by("CARDIO", "1"), received_at=clock())
    index.record_instance(sent_by("MAIN_PACS", "2"), received_at=clock())

    assert index.load_snapshot(STUDY.study_uid).series[0].attributes.sending_ae_title == "CARDIO"


def test_a_resend_from_another_ae_changes_nothing(index: Index, clock: FakeClock) -> None:
    """The same instance again from another AE is UNCHANGED: no republish for a change of sender."""
    index.record_instance(sent_by("CARDIO", "1"), received_at=clock())

    assert index.record_instance(sent_by("MAIN_PACS", "1"), received_at=clock()) is RecordOutcome.UNCHANGED


def test_a_series_indexed_without_a_sender_records_the_next_one(index: Index, clock: FakeClock) -> None:
    """Rows from before the sender was kept (empty) take the sender of the next instance that arrives."""
    index.record_instance(sent_by("", "1"), received_at=clock())

    assert index.record_instance(sent_by("CARDIO", "2"), received_at=clock()) is RecordOutcome.NEW
    assert index.load_snapshot(STUDY.study_uid).series[0].attributes.sending_ae_title == "CARDIO"
