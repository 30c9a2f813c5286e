"""Poison values: the same DIMSE status on SQLite and PostgreSQL, and never 0xA7xx ("try later") for a value no
retry can store.

PostgreSQL refuses a NUL character in text and a value longer than its column, which SQLite stores. The listener
(with the real index on each database behind it, pynetdicom's SCU as the sender) refuses each such dataset with
0xC000 naming the attribute, or indexes it with the value left out, identically on both; the next instance on
the same association is stored. The index itself tells a refused value (0xC000) from an unavailable database
(0xA700) as a safety net for any value extraction would let through.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import Engine, select

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.dicom.status import StoreStatus, status_for_error
from pacs_bridge.errors import UnstorableValueError
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.models import Study
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.records import InstanceRecord, RecordOutcome, SeriesAttributes, StudyAttributes
from tests.conftest import MAX_DELAY, QUIET, FakeClock
from tests.support.studies import make_dataset, uid

POISON_ROWS: list[tuple[str, Any, int, str | None, str]] = [
    # (keyword, value, status, study column, what it holds afterwards; "" for a refused instance)
    ("PatientName", "Zebra\x00^Quokka", 0xC000, None, ""),  # NUL inside: PostgreSQL text cannot hold it
    ("PatientID", "PHI\x00MARK", 0xC000, None, ""),  # never stored as anything else: that would guess an identity
    ("AccessionNumber", "ACC\x000001", 0xC000, None, ""),
    ("IssuerOfPatientID", "HOSP\x00A", 0xC000, None, ""),
    ("StudyDescription", "CT\x00chest", 0xC000, None, ""),
    ("ReferringPhysicianName", "Doc\x00^Who", 0xC000, None, ""),
    ("StudyDate", "2024\x000315", 0xC000, None, ""),
    ("StudyDate", "2" * 17, 0xC000, None, ""),  # over String(16)
    ("StudyTime", "1" * 33, 0xC000, None, ""),  # over String(32)
    ("SeriesDate", "2" * 17, 0xC000, None, ""),
    ("SeriesTime", "1" * 33, 0xC000, None, ""),
    ("TimezoneOffsetFromUTC", "+0100" * 4, 0xC000, None, ""),  # over String(16)
    ("Laterality", "L" * 17, 0xC000, None, ""),
    ("ImageLaterality", "R" * 17, 0xC000, None, ""),
    ("Modality", "CT" * 9, 0xC000, None, ""),
    ("PatientSex", "F" * 17, 0x0000, "patient_sex", ""),  # left out, as an invalid sex always was
    ("PatientSex", "F\x00M", 0x0000, "patient_sex", ""),
    ("PatientBirthDate", "1" * 17, 0x0000, "patient_birth_date", ""),
    ("PatientBirthDate", "1937\x000512", 0x0000, "patient_birth_date", ""),
    ("AccessionNumber", "ACC-0002\x00", 0x0000, "accession_number", "ACC-0002"),  # trailing NUL: padding
    ("StudyDate", "2024031520240315", 0x0000, "study_date", "2024031520240315"),  # 16: fits exactly
    ("AccessionNumber", "A" * 40, 0x0000, "accession_number", "A" * 40),  # over its VR, in a text column
]


def sent_as_is(number: int, keyword: str, value: Any) -> Dataset:
    """Study ``number`` of its own: the minimal CT dataset with ``keyword`` set to ``value``, invalid or not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about the invalid values we mean to send
        ds = make_dataset(
            StudyInstanceUID=uid(f"{number}"),
            SeriesInstanceUID=uid(f"{number}.1"),
            SOPInstanceUID=uid(f"{number}.1.1"),
            **{keyword: value},
        )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def study_column(engine: Engine, number: int, column: str) -> Any:
    with engine.connect() as connection:
        row = connection.execute(select(Study.__table__).where(Study.study_uid == uid(f"{number}"))).mappings().first()
    return None if row is None else row[column]


@pytest.mark.parametrize(
    ("keyword", "value", "status", "column", "held"),
    POISON_ROWS,
    ids=[f"{row[0]}={row[1]!r}" for row in POISON_ROWS],
)
def test_a_poison_value_gets_the_same_final_status_on_both_databases(
    listener: DicomListener,
    engine: Engine,
    keyword: str,
    value: Any,
    status: int,
    column: str | None,
    held: str,
) -> None:
    """The status is the one in the table (never 0xA7xx); a refusal names the attribute and indexes nothing; an
    accepted instance holds the value as the index keeps it; the next instance is stored."""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns again as it encodes the invalid value
        answer = assoc.send_c_store(sent_as_is(1, keyword, value))
    good = assoc.send_c_store(sent_as_is(2, "PatientID", "PAT-0002"))
    assoc.release()

    assert answer.Status == status
    if status == 0xC000:
        assert answer.ErrorComment.startswith(keyword)
        assert study_column(engine, 1, "study_uid") is None
    else:
        assert column is not None and study_column(engine, 1, column) == held
    assert good.Status == 0x0000 and study_column(engine, 2, "patient_id") == "PAT-0002"


def unextractable(number: str, **study: str) -> InstanceRecord:
    """A record extraction never gives (it would refuse the dataset): values only the index can judge."""
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(number), **study),
        series=SeriesAttributes(series_uid=uid(f"{number}.1"), modality="CT"),
        sop_instance_uid=uid(f"{number}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "study",
    [{"patient_id": "PHI\x00MARK"}, {"study_date": "2" * 17}],
    ids=["NUL in text", "over a bounded column"],
)
def test_postgresql_refusing_a_value_is_unstorable_not_unavailable(
    postgres_schema_url: str, clock: FakeClock, study: dict[str, str]
) -> None:
    """The database refuses the value as data: UnstorableValueError, which the listener answers 0xC000 (a retry
    cannot help); the index goes on storing."""
    engine = make_engine(postgres_schema_url)
    prepare_schema(engine)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    try:
        with pytest.raises(UnstorableValueError) as refused:
            index.record_instance(unextractable("1", **study), received_at=clock())
        assert status_for_error(refused.value) is StoreStatus.CANNOT_UNDERSTAND
        assert "PHI" not in str(refused.value)
        assert index.record_instance(unextractable("2"), received_at=clock()) is RecordOutcome.NEW
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_postgresql_one_unstorable_value_in_a_batch_fails_only_its_instance(
    postgres_schema_url: str, clock: FakeClock
) -> None:
    """Group commit: the batch is recorded again one by one; the others are stored, the poison one alone gets its
    UnstorableValueError (not every instance an 0xA700)."""
    engine = make_engine(postgres_schema_url)
    prepare_schema(engine)
    index = Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))
    now = datetime.now(UTC)
    try:
        outcomes = index.record_instances(
            [(unextractable("1"), now), (unextractable("2", patient_id="PHI\x00MARK"), now), (unextractable("3"), now)]
        )
    finally:
        engine.dispose()
    assert outcomes[0] is RecordOutcome.NEW and outcomes[2] is RecordOutcome.NEW
    assert isinstance(outcomes[1], UnstorableValueError)
