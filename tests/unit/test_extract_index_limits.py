"""Every value ``extract_instance`` gives the index is one both databases can hold.

PostgreSQL refuses a NUL character in text and a value longer than its column, which SQLite stores; a value a
retry can never store must not reach the database (the listener would answer 0xA700 "try later" on PostgreSQL
only). Each such value is invalid DICOM and is treated as that attribute treats any invalid value: refused
with an error naming it (0xC000), or, for PatientBirthDate and PatientSex, left out.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import String, Table

from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.errors import InvalidInstanceError
from pacs_bridge.index.models import Instance, RejectedInstance, Series, Study
from pacs_bridge.records import InstanceRecord
from tests.support.studies import make_dataset


def received(**values: Any) -> Dataset:
    """The minimal CT dataset with ``values`` (invalid ones included), as the listener reads it from the wire."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about the invalid values we mean to send
        ds = make_dataset(**values)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
    return read_header(BytesIO(fp.getvalue()), UID(ExplicitVRLittleEndian))


def refusal(ds: Dataset) -> str:
    """The text of the refusal of ``ds`` (fails the test if it is accepted)."""
    with pytest.raises(InvalidInstanceError) as refused:
        extract_instance(ds)
    return str(refused.value)


REFUSED_ROWS = [
    # (keyword, value): refused with 0xC000 naming the keyword
    ("PatientName", "Zebra\x00^Quokka"),  # NUL inside a person name
    ("PatientID", "PAT\x000001"),  # NUL inside the identifier: storing anything else would guess an identity
    ("IssuerOfPatientID", "HOSP\x00A"),  # NUL inside the issuer
    ("AccessionNumber", "ACC\x000001"),  # NUL inside the accession number
    ("StudyDescription", "CT\x00chest"),  # NUL inside a description (a label, but not text DICOM allows)
    ("ReferringPhysicianName", "Doc\x00^Who"),  # NUL inside a single person name kept as text
    ("NameOfPhysiciansReadingStudy", ["Doc^One", "Doc\x00^Two"]),  # NUL inside a multi-valued name (JSON column)
    ("StudyDate", "2024\x000315"),  # NUL inside a date
    ("StudyDate", "20240315" * 2 + "X"),  # 17 characters: over the date column (DA: 8)
    ("StudyTime", "1" * 33),  # over the time column (TM: 14)
    ("SeriesDate", "2" * 17),  # over the date column
    ("SeriesTime", "3" * 33),  # over the time column
    ("TimezoneOffsetFromUTC", "+0100" * 4),  # 20 characters: over the SH column
    ("Modality", "CT" * 9),  # 18 characters: not a code string (CS: 16)
    ("Laterality", "L" * 17),  # over the CS column
    ("Laterality", "\u00df" * 9),  # 9 characters that upper-case to 18 ("SS" each)
    ("ImageLaterality", "R" * 17),  # over the CS column
]


@pytest.mark.parametrize(("keyword", "value"), REFUSED_ROWS, ids=[f"{k}={v!r}" for k, v in REFUSED_ROWS])
def test_a_value_the_index_cannot_hold_is_refused_naming_the_attribute(keyword: str, value: Any) -> None:
    """InvalidInstanceError (0xC000) starting with the keyword, so the ErrorComment names it; the value itself is
    not quoted (it may be patient data, and the error is logged)."""
    text = refusal(received(**{keyword: value}))

    assert text.startswith(f"{keyword} (")
    assert ("NUL character" in text) or ("over the limit of" in text) or ("not a valid code string" in text)
    if keyword != "Modality":  # a modality is quoted: it is no patient data
        values = value if isinstance(value, list) else [value]
        assert not [part for v in values for part in v.split("\x00") if len(part) > 3 and part in text]


KEPT_ROWS = [
    # (keyword, value, record field, value the index keeps)
    ("PatientSex", "F" * 17, "patient_sex", ""),  # over the CS column: left out, as an invalid sex always was
    ("PatientSex", "F\x00M", "patient_sex", ""),  # a NUL inside: left out
    ("PatientBirthDate", "1" * 17, "patient_birth_date", ""),  # over the date column: left out
    ("PatientBirthDate", "1937\x000512", "patient_birth_date", ""),  # a NUL inside: left out
    ("SeriesDescription", "Axial\x00", "series_description", "Axial"),  # trailing NUL padding is stripped
    ("StudyDate", "2024031520240315", "study_date", "2024031520240315"),  # exactly 16 characters: kept
    ("AccessionNumber", "A" * 40, "accession_number", "A" * 40),  # over its VR (SH: 16) but a text column
]


@pytest.mark.parametrize(
    ("keyword", "value", "field", "kept"), KEPT_ROWS, ids=[f"{k}={v!r}" for k, v, _, _ in KEPT_ROWS]
)
def test_a_value_the_bridge_only_passes_on_when_valid_is_left_out(keyword: str, value: str, field: str, kept: str):
    """The instance is accepted; the field holds the value as the index keeps it."""
    record = extract_instance(received(**{keyword: value}))

    assert field_of(record, field) == kept


def field_of(record: InstanceRecord, name: str) -> Any:
    for part in (record, record.study, record.series):
        if hasattr(part, name):
            return getattr(part, name)
    raise AttributeError(name)


# Bounded columns filled from a received dataset: (table, column) -> (keyword, record field).
GUARDED = {
    ("studies", "patient_birth_date"): ("PatientBirthDate", "patient_birth_date"),
    ("studies", "patient_sex"): ("PatientSex", "patient_sex"),
    ("studies", "study_date"): ("StudyDate", "study_date"),
    ("studies", "study_time"): ("StudyTime", "study_time"),
    ("studies", "timezone_offset"): ("TimezoneOffsetFromUTC", "timezone_offset"),
    ("series", "modality"): ("Modality", "modality"),
    ("series", "series_date"): ("SeriesDate", "series_date"),
    ("series", "series_time"): ("SeriesTime", "series_time"),
    ("series", "laterality"): ("Laterality", "laterality"),
    ("instances", "image_laterality"): ("ImageLaterality", "image_laterality"),
}
# Bounded columns whose values are bounded elsewhere, and why.
BOUNDED_ELSEWHERE = {
    ("studies", "study_uid"),  # UIDs: extract refuses over 64 characters (test_extract.py)
    ("series", "series_uid"),
    ("instances", "sop_instance_uid"),
    ("instances", "sop_class_uid"),
    ("rejected_instances", "sop_instance_uid"),
    ("rejected_instances", "study_uid"),
    ("rejected_instances", "series_uid"),
    ("rejected_instances", "note_uid"),
    ("rejected_instances", "modality"),  # copied from an indexed series
    ("rejected_instances", "reason_code"),  # one of four DCM codes (records.RejectionReason)
    ("series", "sending_ae_title"),  # the calling AE title: pynetdicom refuses one over 16 characters
    ("studies", "publish_state"),  # the bridge's own values, never a sender's
    ("studies", "claimed_by"),
    ("studies", "published_hash"),
    ("studies", "published_version"),
}


def bounded_columns() -> dict[tuple[str, str], int]:
    tables = [Study.__table__, Series.__table__, Instance.__table__, RejectedInstance.__table__]
    return {
        (table.name, column.name): column.type.length
        for table in tables
        if isinstance(table, Table)
        for column in table.columns
        if isinstance(column.type, String) and column.type.length is not None
    }


def test_every_bounded_column_is_guarded_or_bounded_elsewhere() -> None:
    """A bounded column added to index/models.py needs a row above (and a guard in extract) or a reason."""
    assert set(bounded_columns()) == set(GUARDED) | BOUNDED_ELSEWHERE


@pytest.mark.parametrize(("column", "source"), sorted(GUARDED.items()), ids=[".".join(c) for c in sorted(GUARDED)])
def test_a_value_one_character_over_its_column_never_reaches_the_index(
    column: tuple[str, str], source: tuple[str, str]
) -> None:
    """One character over the column's length: refused naming the attribute, or left out."""
    keyword, field = source
    length = bounded_columns()[column]
    ds = received(**{keyword: "1" * (length + 1) if keyword != "Modality" else "M" * (length + 1)})
    try:
        record = extract_instance(ds)
    except InvalidInstanceError as refused:
        assert str(refused).startswith(f"{keyword} (")
        return
    assert len(field_of(record, field)) <= length
