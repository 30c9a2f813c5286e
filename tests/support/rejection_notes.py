"""Build IHE IOCM rejection notes (Key Object Selection Documents) in code with pydicom."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from tests.support.studies import make_dataset

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
# The document titles of CID 7010 (Key Object Selection Document Title) used in the tests.
TITLES = {
    "113000": "Of Interest",
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_rejection_note(
    references: Iterable[tuple[str, str, str]],
    *,
    title: str = "113001",
    note_uid: str,
    note_series_uid: str,
    study_uid: str | None = None,
    scheme: str = "DCM",
) -> Dataset:
    """A Key Object Selection Document titled ``title`` referencing ``(study, series, SOP instance)`` UIDs.

    The note lives in the study of its first reference unless ``study_uid`` says otherwise, as IOCM notes do.
    """
    references = list(references)
    by_study: dict[str, dict[str, list[str]]] = {}
    for study, series, instance in references:
        by_study.setdefault(study, {}).setdefault(series, []).append(instance)
    ds = make_dataset(
        SOPClassUID=KEY_OBJECT_SELECTION,
        SOPInstanceUID=note_uid,
        StudyInstanceUID=study_uid or references[0][0],
        SeriesInstanceUID=note_series_uid,
        Modality="KO",
        SeriesNumber=999,
        SeriesDescription="Rejection note",
        InstanceNumber=1,
    )
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code(title, TITLES.get(title, "Other title"), scheme)])
    evidence = []
    content = []
    for study, series_map in by_study.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study
        series_items = []
        for series, instances in series_map.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series
            sop_items = []
            for instance in instances:
                sop = Dataset()
                sop.ReferencedSOPClassUID = CTImageStorage
                sop.ReferencedSOPInstanceUID = instance
                sop_items.append(sop)
                image = Dataset()
                image.RelationshipType = "CONTAINS"
                image.ValueType = "IMAGE"
                image.ReferencedSOPSequence = Sequence([copy.deepcopy(sop)])
                content.append(image)
            series_item.ReferencedSOPSequence = Sequence(sop_items)
            series_items.append(series_item)
        study_item.ReferencedSeriesSequence = Sequence(series_items)
        evidence.append(study_item)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence(evidence)
    ds.ContentSequence = Sequence(content)
    return ds
