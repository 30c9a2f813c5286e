"""Pure extraction: a received pydicom ``Dataset`` -> the ``InstanceRecord`` the index keeps.

No I/O here. pydicom decodes element values lazily, so a value that cannot be decoded only fails when it is
read: every read goes through ``_read_value`` which turns such a failure into ``InvalidInstanceError`` naming
the attribute. ASCII-only value representations (UI, CS, DA, TM, IS) are parsed from the raw bytes when the
dataset was read from the wire, so malformed numbers never depend on pydicom's validation mode.

Every value given to the index is one it can hold, on SQLite and PostgreSQL alike: no text holds a NUL
character (DICOM allows NUL only as padding, which is stripped), and no value is longer than its bounded
column (``records.MAX_*_CHARS``, at least DICOM's maximum for the VR). Such a value is invalid DICOM, and is
treated as that attribute treats any invalid value: refused with ``InvalidInstanceError`` naming it, or, for
the attributes the bridge only passes on when valid (PatientBirthDate, PatientSex), left out.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from pacs_bridge.errors import InvalidInstanceError
from pacs_bridge.records import (
    MAX_CODE_CHARS,
    MAX_DATE_CHARS,
    MAX_TIME_CHARS,
    CodedConcept,
    InstanceRecord,
    RejectedReference,
    RejectionNote,
    RejectionReason,
    RequestedReason,
    SeriesAttributes,
    StudyAttributes,
)

# Every attribute extract_instance reads. The DICOM listener reads only these from the wire (and stops
# before the pixel data), so adding an attribute here is all it takes to make it available.
HEADER_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "SeriesTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "Modality",
    "TimezoneOffsetFromUTC",
    "StudyDescription",
    "SeriesDescription",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    # What the FHIR mapping needs beyond the UIDs and dates (docs/mapping.md):
    "ReferringPhysicianName",
    "ProcedureCodeSequence",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "BodyPartExamined",
    "Laterality",
    "ImageLaterality",
    "RequestedProcedureCodeSequence",
    "RequestAttributesSequence",
    "ReasonForTheRequestedProcedure",
    "ReasonForRequestedProcedureCodeSequence",
    "ConceptNameCodeSequence",
    "DocumentTitle",
    "ContentLabel",
    # IHE IOCM rejection notes: the instances a Key Object Selection withdraws (nested items are read whole).
    "CurrentRequestedProcedureEvidenceSequence",
)


@functools.cache
def _tag_of(keyword: str) -> BaseTag:
    """The tag of ``keyword``, as a ``BaseTag``: a dataset looks that up without converting it (every element
    read of every C-STORE)."""
    tag = tag_for_keyword(keyword)
    if tag is None:  # a typo in HEADER_KEYWORDS: a programming error, caught by the unit tests
        raise KeyError(keyword)
    return BaseTag(tag)


HEADER_TAGS: tuple[int, ...] = tuple(sorted(int(_tag_of(keyword)) for keyword in HEADER_KEYWORDS))

_ESC = b"\x1b"  # starts an ISO 2022 escape sequence (PS3.5 6.1.2.5)
_NUL = "\x00"
_HOLDS_NUL = "holds a NUL character, which DICOM text does not allow"
MAX_UID_LENGTH = 64
# PS3.5 9.1: components of digits separated by dots. Leading zeros inside a component are a violation that
# real archives tolerate, so they are accepted; letters, spaces, empty components and over-long values are not.
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_MODALITY_PATTERN = re.compile(rf"[A-Z0-9_ ]{{1,{MAX_CODE_CHARS}}}")
# Modality is Type 1 in the General Series module, yet some secondary-capture objects leave it out;
# FHIR series.modality is 1..1, and DICOM's own code for "other" is OT.
MODALITY_WHEN_ABSENT = "OT"


def _tag_text(keyword: str) -> str:
    tag = Tag(_tag_of(keyword))
    return f"({tag.group:04X},{tag.element:04X})"


def _read_value(ds: Dataset, keyword: str) -> Any:
    """The element's value: raw ``bytes`` when not yet decoded, else pydicom's value; ``None`` when absent."""
    tag = _tag_of(keyword)
    try:
        element = ds.get_item(tag)
        return None if element is None else element.value
    except Exception as exc:  # pydicom raises assorted types for undecodable bytes
        raise InvalidInstanceError(keyword, _tag_text(keyword), f"cannot be decoded ({exc})") from exc


def _first_ascii_value(value: bytes) -> str:
    """The first of the backslash-separated values in ``value``, decoded as ASCII, without its padding.

    Raises ``UnicodeDecodeError`` when ``value`` holds a byte above 0x7F."""
    return value.decode("ascii").split("\\", 1)[0].strip(" \x00")


def _without_nul(keyword: str, text: str) -> str:
    """``text``, unless it holds a NUL character (PostgreSQL text cannot, and DICOM text may not)."""
    if _NUL in text:
        raise InvalidInstanceError(keyword, _tag_text(keyword), _HOLDS_NUL)
    return text


def _within(keyword: str, text: str, limit: int) -> str:
    """``text``, unless it is longer than ``limit`` characters (the index's column for it)."""
    if len(text) > limit:
        raise InvalidInstanceError(keyword, _tag_text(keyword), f"{len(text)} characters, over the limit of {limit}")
    return text


def _read_ascii(ds: Dataset, keyword: str) -> str:
    """An ASCII-only value (UI, CS, DA, TM, IS) without its padding; the first value of a multi-valued one."""
    value = _read_value(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return _without_nul(keyword, _first_ascii_value(value))
        except UnicodeDecodeError as exc:
            raise InvalidInstanceError(keyword, _tag_text(keyword), f"holds non-ASCII bytes {value[:32]!r}") from exc
    if isinstance(value, MultiValue | list):
        return _without_nul(keyword, str(value[0]).strip(" \x00")) if len(value) else ""
    return _without_nul(keyword, str(value).strip(" \x00"))


def _bounded_ascii(ds: Dataset, keyword: str, limit: int) -> str:
    """An ASCII value (DA, TM, SH offset) the index keeps in a column of ``limit`` characters."""
    return _within(keyword, _read_ascii(ds, keyword), limit)


def _is_plain_ascii(value: bytes) -> bool:
    """Whether ``value`` reads the same as ASCII in every character set DICOM allows, and as the same text in
    every text VR: bytes below 0x80, no ISO 2022 escape (only escapes switch sets), and no "=" (which separates
    a person name's component groups, of which pydicom drops the empty ones)."""
    return value.isascii() and _ESC not in value and b"=" not in value


def _read_text(ds: Dataset, keyword: str) -> str:
    """A text value (LO, SH, PN, CS) decoded with the dataset's Specific Character Set, without its padding; the
    first value of a multi-valued one."""
    tag = _tag_of(keyword)
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    if isinstance(raw, RawDataElement) and type(raw.value) is bytes and _is_plain_ascii(raw.value):
        # Decoded here, without pydicom's conversion: this runs for every text of every C-STORE.
        return _without_nul(keyword, _first_ascii_value(raw.value))
    try:
        value = ds[tag].value
    except Exception as exc:  # undecodable bytes in the dataset's character set
        raise InvalidInstanceError(keyword, _tag_text(keyword), f"cannot be decoded ({exc})") from exc
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        value = value[0] if len(value) else ""
    return _without_nul(keyword, str(value).strip(" \x00"))


def _read_texts(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """Every value of a multi-valued text or person name (LO, PN), decoded, unpadded, empty ones left out."""
    tag = _tag_of(keyword)
    if tag not in ds:
        return ()
    try:
        value = ds[tag].value
    except Exception as exc:  # undecodable bytes in the dataset's character set
        raise InvalidInstanceError(keyword, _tag_text(keyword), f"cannot be decoded ({exc})") from exc
    if value is None:
        return ()
    values = value if isinstance(value, MultiValue | list) else [value]
    texts = (_without_nul(keyword, str(item).strip(" \x00")) for item in values)
    return tuple(text for text in texts if text)


def _sequence_items(ds: Dataset, keyword: str) -> list[Dataset]:
    """The items of a sequence attribute; empty when absent."""
    tag = _tag_of(keyword)
    if tag not in ds:
        return []
    try:
        value = ds[tag].value
    except Exception as exc:  # a sequence that cannot be parsed
        raise InvalidInstanceError(keyword, _tag_text(keyword), f"cannot be decoded ({exc})") from exc
    if not value:
        return []
    return [item for item in value if isinstance(item, Dataset)]


def _read_codes(ds: Dataset, keyword: str) -> tuple[CodedConcept, ...]:
    """The coded entries of a code sequence; items with neither a code nor a meaning are left out.

    A URNCodeValue stands without a CodingSchemeDesignator (PS3.3 8.7.3.3), so its scheme stays empty.
    """
    concepts = []
    for item in _sequence_items(ds, keyword):
        code = _read_text(item, "CodeValue") or _read_text(item, "LongCodeValue") or _read_text(item, "URNCodeValue")
        meaning = _read_text(item, "CodeMeaning")
        if not code and not meaning:
            continue
        concepts.append(
            CodedConcept(
                code=code,
                scheme=_read_text(item, "CodingSchemeDesignator"),
                meaning=meaning,
                scheme_version=_read_text(item, "CodingSchemeVersion"),
            )
        )
    return tuple(concepts)


def _with_request_attributes(ds: Dataset) -> list[Dataset]:
    """The dataset itself, then each Request Attributes Sequence item: where the order's attributes live."""
    return [ds, *_sequence_items(ds, "RequestAttributesSequence")]


def _procedure_codes(ds: Dataset) -> tuple[CodedConcept, ...]:
    """ProcedureCodeSequence (what was performed); without it, the requested procedure's codes."""
    performed = _read_codes(ds, "ProcedureCodeSequence")
    if performed:
        return performed
    requested = (
        code
        for source in _with_request_attributes(ds)
        for code in _read_codes(source, "RequestedProcedureCodeSequence")
    )
    return tuple(dict.fromkeys(requested))


def _reasons(ds: Dataset) -> tuple[RequestedReason, ...]:
    """One reason per source (top level, each Request Attributes item) that states one: its text with the codes
    of the same source, duplicates removed. A text alone that a coded reason also states is that reason."""
    stated = [
        RequestedReason(
            text=_read_text(source, "ReasonForTheRequestedProcedure"),
            codes=_read_codes(source, "ReasonForRequestedProcedureCodeSequence"),
        )
        for source in _with_request_attributes(ds)
    ]
    coded_texts = {reason.text for reason in stated if reason.codes}
    return tuple(
        dict.fromkeys(
            reason
            for reason in stated
            if (reason.text or reason.codes) and (reason.codes or reason.text not in coded_texts)
        )
    )


def _accession_issuer(ds: Dataset) -> tuple[str, str]:
    """LocalNamespaceEntityID and UniversalEntityID of the Issuer of Accession Number Sequence (one item, PS3.3
    10.2.1 HL7v2 Hierarchic Designator Macro); empty strings when absent."""
    items = _sequence_items(ds, "IssuerOfAccessionNumberSequence")
    if not items:
        return "", ""
    return _read_text(items[0], "LocalNamespaceEntityID"), _read_text(items[0], "UniversalEntityID")


def _instance_title(ds: Dataset) -> str:
    """ContentLabel (presentation states, segmentations), DocumentTitle (encapsulated documents), else the
    meaning of the document title code (ConceptNameCodeSequence of SR and key object selection)."""
    title = _read_text(ds, "ContentLabel") or _read_text(ds, "DocumentTitle")
    if title:
        return title
    concept_names = _read_codes(ds, "ConceptNameCodeSequence")
    return concept_names[0].meaning if concept_names else ""


def _required_uid(ds: Dataset, keyword: str) -> str:
    uid = _read_ascii(ds, keyword)
    if not uid:
        raise InvalidInstanceError(keyword, _tag_text(keyword), "is missing or empty; it is required")
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidInstanceError(
            keyword, _tag_text(keyword), f"is {len(uid)} characters long, over the limit of 64: {uid[:40]}..."
        )
    if not _UID_PATTERN.fullmatch(uid):
        raise InvalidInstanceError(keyword, _tag_text(keyword), f"is not a valid UID: {uid!r}")
    return uid


def _optional_integer(ds: Dataset, keyword: str) -> int | None:
    """An IS value as int; ``None`` when absent or not an integer (these numbers are optional in FHIR)."""
    try:
        text = _read_ascii(ds, keyword)
    except InvalidInstanceError:
        return None
    try:
        number = int(text)
    except ValueError:
        return None
    # FHIR unsignedInt: 0 .. 2^31-1
    return number if 0 <= number < 2**31 else None


def _optional_ascii(ds: Dataset, keyword: str, limit: int) -> str:
    """An ASCII value the bridge only passes on when valid (PatientBirthDate, PatientSex for patient.mode
    create); non-ASCII bytes, a NUL or more than ``limit`` characters give an empty value rather than refusing
    the instance."""
    try:
        return _within(keyword, _read_ascii(ds, keyword), limit)
    except InvalidInstanceError:
        return ""


def _modality(ds: Dataset) -> str:
    modality = _read_ascii(ds, "Modality").upper()
    if not modality:
        return MODALITY_WHEN_ABSENT
    if not _MODALITY_PATTERN.fullmatch(modality):
        raise InvalidInstanceError("Modality", _tag_text("Modality"), f"is not a valid code string: {modality!r}")
    return modality


KEY_OBJECT_SELECTION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def _rejection_reason(ds: Dataset) -> RejectionReason | None:
    """The IOCM rejection reason a Key Object Selection's document title states; ``None`` for any other title
    (Of Interest, For Teaching ...), which makes it an ordinary instance."""
    titles = _read_codes(ds, "ConceptNameCodeSequence")
    if not titles or titles[0].scheme != "DCM":
        return None
    try:
        return RejectionReason(titles[0].code)
    except ValueError:
        return None


def _rejected_references(ds: Dataset) -> tuple[RejectedReference, ...]:
    """Study -> ReferencedSeriesSequence -> ReferencedSOPSequence of CurrentRequestedProcedureEvidenceSequence."""
    references = []
    for study_item in _sequence_items(ds, "CurrentRequestedProcedureEvidenceSequence"):
        study_uid = _required_uid(study_item, "StudyInstanceUID")
        for series_item in _sequence_items(study_item, "ReferencedSeriesSequence"):
            series_uid = _required_uid(series_item, "SeriesInstanceUID")
            for instance_item in _sequence_items(series_item, "ReferencedSOPSequence"):
                references.append(
                    RejectedReference(
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_instance_uid=_required_uid(instance_item, "ReferencedSOPInstanceUID"),
                    )
                )
    if not references:
        keyword = "CurrentRequestedProcedureEvidenceSequence"
        raise InvalidInstanceError(keyword, _tag_text(keyword), "references no instance; a rejection note needs one")
    unique: dict[str, RejectedReference] = {}
    for reference in references:  # an instance listed twice: its first mention counts
        unique.setdefault(reference.sop_instance_uid, reference)
    return tuple(unique.values())


def extract_rejection_note(ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str) -> RejectionNote | None:
    """The IHE IOCM rejection note ``ds`` is, or ``None`` when it is not one.

    A rejection note is a Key Object Selection Document whose title (ConceptNameCodeSequence) is one of the
    four DCM rejection codes. Raises ``InvalidInstanceError`` when it references no instance or a referenced
    UID is malformed.
    """
    if sop_class_uid != KEY_OBJECT_SELECTION_SOP_CLASS:
        return None
    reason = _rejection_reason(ds)
    if reason is None:
        return None
    return RejectionNote(note_uid=sop_instance_uid, reason=reason, references=_rejected_references(ds))


def extract_instance(ds: Dataset, *, sending_ae_title: str = "") -> InstanceRecord:
    """Map one received dataset to its ``InstanceRecord``; ``sending_ae_title`` is the calling AE title of the
    association it came on (not in the dataset), recorded with the series.

    Raises ``InvalidInstanceError`` naming the attribute when a UID the index is keyed on is missing or
    malformed, or when a value cannot be decoded.
    """
    study_uid = _required_uid(ds, "StudyInstanceUID")
    series_uid = _required_uid(ds, "SeriesInstanceUID")
    sop_instance_uid = _required_uid(ds, "SOPInstanceUID")
    sop_class_uid = _required_uid(ds, "SOPClassUID")
    accession_issuer_local_id, accession_issuer_universal_id = _accession_issuer(ds)
    return InstanceRecord(
        study=StudyAttributes(
            study_uid=study_uid,
            patient_id=_read_text(ds, "PatientID"),
            issuer_of_patient_id=_read_text(ds, "IssuerOfPatientID"),
            patient_name=_read_text(ds, "PatientName"),
            patient_birth_date=_optional_ascii(ds, "PatientBirthDate", MAX_DATE_CHARS),
            patient_sex=_optional_ascii(ds, "PatientSex", MAX_CODE_CHARS).upper(),
            accession_number=_read_text(ds, "AccessionNumber"),
            accession_issuer_local_id=accession_issuer_local_id,
            accession_issuer_universal_id=accession_issuer_universal_id,
            study_date=_bounded_ascii(ds, "StudyDate", MAX_DATE_CHARS),
            study_time=_bounded_ascii(ds, "StudyTime", MAX_TIME_CHARS),
            timezone_offset=_bounded_ascii(ds, "TimezoneOffsetFromUTC", MAX_CODE_CHARS),
            study_description=_read_text(ds, "StudyDescription"),
            referring_physician=_read_text(ds, "ReferringPhysicianName"),
            reading_physicians=_read_texts(ds, "NameOfPhysiciansReadingStudy"),
            procedure_codes=_procedure_codes(ds),
            reasons=_reasons(ds),
        ),
        series=SeriesAttributes(
            series_uid=series_uid,
            modality=_modality(ds),
            series_number=_optional_integer(ds, "SeriesNumber"),
            series_description=_read_text(ds, "SeriesDescription"),
            series_date=_bounded_ascii(ds, "SeriesDate", MAX_DATE_CHARS),
            series_time=_bounded_ascii(ds, "SeriesTime", MAX_TIME_CHARS),
            body_part_examined=_read_text(ds, "BodyPartExamined").upper(),
            laterality=_within("Laterality", _read_text(ds, "Laterality").upper(), MAX_CODE_CHARS),
            performing_physicians=_read_texts(ds, "PerformingPhysicianName"),
            operators=_read_texts(ds, "OperatorsName"),
            sending_ae_title=sending_ae_title,
        ),
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        instance_number=_optional_integer(ds, "InstanceNumber"),
        image_laterality=_within("ImageLaterality", _read_text(ds, "ImageLaterality").upper(), MAX_CODE_CHARS),
        title=_instance_title(ds),
        rejection_note=extract_rejection_note(ds, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid),
    )
