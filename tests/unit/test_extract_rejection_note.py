"""Unit tests for recognising IHE IOCM rejection notes in ``pacs_bridge.dicom.extract``."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian

from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.errors import InvalidInstanceError
from pacs_bridge.records import RejectedReference, RejectionNote, RejectionReason
from tests.support.rejection_notes import make_rejection_note
from tests.support.studies import uid
from tests.unit.test_extract import encode, lenient_pydicom  # noqa: F401 - lenient_pydicom is a fixture

STUDY = uid("1")
NOTE_UID = uid("5.1.1")
NOTE_SERIES = uid("5.1")
REFERENCES = [
    (STUDY, uid("2.1"), uid("3.1.1")),
    (STUDY, uid("2.1"), uid("3.1.2")),
    (STUDY, uid("2.2"), uid("3.2.1")),
]


def note(references: list[tuple[str, str, str]] = REFERENCES, *, title: str = "113001", scheme: str = "DCM") -> Dataset:
    return make_rejection_note(references, note_uid=NOTE_UID, note_series_uid=NOTE_SERIES, title=title, scheme=scheme)


def expected_note(reason: RejectionReason) -> RejectionNote:
    return RejectionNote(
        note_uid=NOTE_UID,
        reason=reason,
        references=tuple(RejectedReference(study_uid=s, series_uid=r, sop_instance_uid=i) for s, r, i in REFERENCES),
    )


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("113001", RejectionReason.QUALITY),  # Rejected for Quality Reasons
        ("113037", RejectionReason.PATIENT_SAFETY),  # Rejected for Patient Safety Reasons
        ("113038", RejectionReason.INCORRECT_WORKLIST_ENTRY),  # Incorrect Modality Worklist Entry
        ("113039", RejectionReason.RETENTION_EXPIRED),  # Data Retention Policy Expired
    ],
)
def test_key_object_selection_with_a_rejection_title_is_a_rejection_note_with_its_references(
    title: str, reason: RejectionReason
) -> None:
    """Each of the four IOCM titles makes a rejection note listing every referenced instance, in order."""
    record = extract_instance(note(title=title))

    assert record.rejection_note == expected_note(reason)


def test_rejection_note_read_header_only_from_the_wire_keeps_its_references() -> None:
    """The listener's header-only read includes the evidence sequence, nested items and all."""
    dataset = read_header(BytesIO(encode(note(title="113037"))), ExplicitVRLittleEndian)

    assert extract_instance(dataset).rejection_note == expected_note(RejectionReason.PATIENT_SAFETY)


@pytest.mark.parametrize(
    ("title", "scheme", "sop_class"),
    [
        ("113000", "DCM", None),  # Of Interest: a key object selection for people, not a rejection
        ("113001", "99LOCAL", None),  # the code under another scheme is another concept
        ("113001", "DCM", BasicTextSRStorage),  # a rejection title on an SR document is no IOCM note
    ],
)
def test_other_key_object_selections_and_documents_are_ordinary_instances(
    title: str, scheme: str, sop_class: str | None
) -> None:
    """Only a Key Object Selection titled with a DCM rejection code is a note; the rest are indexed as usual."""
    ds = note(title=title, scheme=scheme)
    if sop_class is not None:
        ds.SOPClassUID = sop_class

    record = extract_instance(ds)

    assert record.rejection_note is None
    assert (record.sop_instance_uid, record.series.modality) == (NOTE_UID, "KO")


def test_reference_listed_twice_counts_once() -> None:
    """An instance named twice in the evidence is one reference, at its first place."""
    record = extract_instance(note([*REFERENCES, REFERENCES[0]]))

    assert record.rejection_note == expected_note(RejectionReason.QUALITY)


def test_rejection_note_referencing_nothing_is_refused_naming_the_evidence_sequence() -> None:
    """A note with an empty evidence sequence cannot say what it rejects: refused, not ignored."""
    ds = note()
    ds.CurrentRequestedProcedureEvidenceSequence = []

    with pytest.raises(InvalidInstanceError, match=r"CurrentRequestedProcedureEvidenceSequence \(0040,A375\)"):
        extract_instance(ds)


@pytest.mark.usefixtures("lenient_pydicom")
def test_rejection_note_with_a_malformed_referenced_uid_is_refused_naming_it() -> None:
    """A referenced SOP Instance UID that is not a UID is refused, naming the nested attribute."""
    ds = note([(STUDY, uid("2.1"), "1.2.abc")])

    with pytest.raises(InvalidInstanceError, match=r"ReferencedSOPInstanceUID \(0008,1155\)"):
        extract_instance(ds)
