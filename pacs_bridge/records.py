"""Plain, immutable records passed between the layers (stdlib only).

``InstanceRecord`` is what one received DICOM instance contributes to the index. ``StudySnapshot`` is what the
index holds for a study, read back for the FHIR mapping. DICOM date and time values are kept as the DICOM
strings (DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``, offset ``+HHMM``) so that their precision survives until the
mapping renders them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

# The longest values the index holds for the record fields it keeps in bounded columns (index/models.py sizes its
# columns with them; dicom/extract.py never gives a longer value). Each is at least DICOM's maximum for the VR.
MAX_DATE_CHARS = 16  # DA: 8, or 10 in the ACR-NEMA form YYYY.MM.DD
MAX_TIME_CHARS = 32  # TM: 14 (28 as a range)
MAX_CODE_CHARS = 16  # CS (PatientSex, Modality, Laterality, ImageLaterality), SH (TimezoneOffsetFromUTC), AE


@dataclass(frozen=True, slots=True, kw_only=True)
class CodedConcept:
    """One item of a DICOM code sequence (Basic Code Sequence Macro), as received.

    ``code`` is whichever of CodeValue, LongCodeValue or URNCodeValue the item holds; ``scheme`` is the
    CodingSchemeDesignator (``SCT``, ``LN``, ``99LOCAL`` ...); the FHIR mapping turns it into a system URI.
    """

    code: str
    scheme: str
    meaning: str = ""
    scheme_version: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestedReason:
    """One Reason for the Requested Procedure, as one source states it: the dataset's top level or one Request
    Attributes item. Its text (0040,1002) and its codes (0040,100A) are one concept, however it is stated."""

    text: str = ""
    codes: tuple[CodedConcept, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyAttributes:
    """Study-level attributes as the latest received instance states them."""

    study_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    # For the Patient that patient.mode create makes (fhir/patient.py): PN string, DA string, CS (M, F, O).
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    # Issuer of Accession Number Sequence (0008,0051), first item: LocalNamespaceEntityID, UniversalEntityID.
    accession_issuer_local_id: str = ""
    accession_issuer_universal_id: str = ""
    study_date: str = ""
    study_time: str = ""
    timezone_offset: str = ""
    study_description: str = ""
    # Person names are kept as the DICOM PN string (``Family^Given^Middle^Prefix^Suffix``, component groups
    # separated by ``=``), decoded with the dataset's Specific Character Set; the mapping renders them.
    referring_physician: str = ""
    reading_physicians: tuple[str, ...] = ()
    procedure_codes: tuple[CodedConcept, ...] = ()  # ProcedureCodeSequence, else RequestedProcedureCodeSequence
    reasons: tuple[RequestedReason, ...] = ()  # each with its text and codes


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesAttributes:
    """Series-level attributes as the latest received instance of the series states them."""

    series_uid: str
    modality: str
    series_number: int | None = None
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""
    body_part_examined: str = ""  # the BodyPartExamined defined term, upper case
    laterality: str = ""  # series Laterality (R, L); instances may state ImageLaterality instead
    performing_physicians: tuple[str, ...] = ()  # PN strings
    operators: tuple[str, ...] = ()  # PN strings
    # Not from the dataset: the calling AE title of the association that first sent the series (for
    # series-level endpoint rules); kept as first recorded, so a later re-send by another AE changes nothing.
    sending_ae_title: str = ""


class RejectionReason(enum.StrEnum):
    """The IHE IOCM rejection note titles (Key Object Selection Document Title, CID 7010, scheme DCM)."""

    QUALITY = "113001"  # Rejected for Quality Reasons
    PATIENT_SAFETY = "113037"  # Rejected for Patient Safety Reasons
    INCORRECT_WORKLIST_ENTRY = "113038"  # Incorrect Modality Worklist Entry
    RETENTION_EXPIRED = "113039"  # Data Retention Policy Expired


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedReference:
    """One instance a rejection note withdraws, as the note's evidence sequence states it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectionNote:
    """An IHE IOCM rejection note: it withdraws the instances it references and is not an instance itself."""

    note_uid: str  # the note's own SOP Instance UID
    reason: RejectionReason
    references: tuple[RejectedReference, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRecord:
    """What one received instance contributes to the index.

    When ``rejection_note`` is set the instance is an IHE IOCM rejection note: the index applies it (removes
    what it references) and does not list it as an instance.
    """

    study: StudyAttributes
    series: SeriesAttributes
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None = None
    image_laterality: str = ""  # ImageLaterality (R, L, U, B)
    title: str = ""  # ContentLabel, else DocumentTitle, else the ConceptNameCodeSequence meaning
    rejection_note: RejectionNote | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceSnapshot:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None = None
    image_laterality: str = ""
    title: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesSnapshot:
    attributes: SeriesAttributes
    instances: tuple[InstanceSnapshot, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyWithdrawal:
    """Why a study has no instance left: IHE IOCM rejection notes withdrew every one it had."""

    reasons: tuple[RejectionReason, ...]  # of every rejection recorded for the study, sorted
    modalities: tuple[str, ...]  # of the series the rejected instances were in, sorted


@dataclass(frozen=True, slots=True, kw_only=True)
class StudySnapshot:
    """Everything the index holds for one study, in a stable order (series, then instances, by UID)."""

    attributes: StudyAttributes
    series: tuple[SeriesSnapshot, ...]
    change_seq: int
    published_hash: str | None = None
    withdrawal: StudyWithdrawal | None = None  # set when rejection notes withdrew every instance

    @property
    def study_uid(self) -> str:
        return self.attributes.study_uid

    @property
    def number_of_instances(self) -> int:
        return sum(len(series.instances) for series in self.series)


class RecordOutcome(enum.Enum):
    """What recording one received instance did to the index."""

    NEW = "new"  # the instance was not in the index
    UPDATED = "updated"  # known instance, but an indexed attribute changed
    UNCHANGED = "unchanged"  # a re-send with nothing new: the study's due time is left alone
    REJECTED = "rejected"  # an instance a rejection note withdrew, sent again: stays out of the index
    REJECTION_NOTE = "rejection_note"  # an IOCM rejection note, applied: what it references is withdrawn


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """How one reference of a published study (subject's Patient, basedOn's ServiceRequest) reaches its target.

    ``key`` is a digest of the identifier search (``system|value``) the reference was looked up by; None: the
    identifier is not searchable (no system, unmapped issuer, identifier mode), so it is never looked up or linked.
    ``reference`` is the literal reference sent (``Patient/123``); None: the reference is by identifier only.
    """

    key: str | None = None
    reference: str | None = None

    @property
    def waiting(self) -> bool:
        """Searchable but sent by identifier only: a relink pass may still find its target."""
        return self.key is not None and self.reference is None


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyLinks:
    """The links of a study as last published, and when the relink pass looks the waiting ones up again."""

    patient: Link = Link()
    order: Link = Link()
    relink_at: datetime | None = None  # None: nothing waits (or relinking had nothing to schedule)
    relink_attempts: int = 0  # lookups in a row that found nothing new: the relink backoff

    @property
    def waiting(self) -> bool:
        return self.patient.waiting or self.order.waiting
