"""Plain, immutable records passed between the layers (stdlib only).

``InstanceRecord`` is what one received DICOM instance contributes to the index. ``StudySnapshot`` is what the
index holds for a study, read back for the FHIR mapping. DICOM date and time values are kept as the DICOM
strings (DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``, offset ``+HHMM``) so that their precision survives until the
mapping renders them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyAttributes:
    """Study-level attributes as the latest received instance states them."""

    study_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    timezone_offset: str = ""
    study_description: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesAttributes:
    """Series-level attributes as the latest received instance of the series states them."""

    series_uid: str
    modality: str
    series_number: int | None = None
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRecord:
    """What one received instance contributes to the index."""

    study: StudyAttributes
    series: SeriesAttributes
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceSnapshot:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesSnapshot:
    attributes: SeriesAttributes
    instances: tuple[InstanceSnapshot, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StudySnapshot:
    """Everything the index holds for one study, in a stable order (series, then instances, by UID)."""

    attributes: StudyAttributes
    series: tuple[SeriesSnapshot, ...]
    change_seq: int
    published_hash: str | None = None

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
