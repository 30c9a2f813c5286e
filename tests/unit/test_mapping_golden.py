"""Golden ImagingStudy resources, R4 and R5, for the studies issue 3 names, built the way the bridge builds them:
DICOM datasets encoded in their character set -> the listener's header reader -> extract -> records grouped like
the index groups them -> build_imaging_study.

Cases: a multi-series CT with a dose SR and a presentation state (TimezoneOffsetFromUTC -0500); a bilateral
mammogram (no offset: the site zone, Europe/Paris in winter); Latin-1 (no offset: Paris summer time), UTF-8
(+0300) and Japanese ISO 2022 IR 87 (+0900) studies.

The golden files were generated from the builder and then reviewed by hand, element by element, against the
R4 and R5 ImagingStudy definitions in /work/shared/spec and docs/mapping.md. To regenerate after an intended
change: ``PACS_BRIDGE_WRITE_GOLDEN=1 python -m pytest tests/unit/test_mapping_golden.py``, then review the
diff the same way; never bless a diff unread.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study
from pacs_bridge.records import InstanceRecord, InstanceSnapshot, SeriesSnapshot, StudySnapshot
from tests.support.studies import make_dataset
from tests.unit.test_extract import encode

GOLDEN = Path(__file__).parent / "golden"
ROOT = "1.2.826.0.1.3680043.10.1482.50."

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

R4_SETTINGS = MappingSettings(
    endpoints=(
        EndpointSettings(
            id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://pacs.example.org/dicom-web"
        ),
    ),
    patient_identifier_system="urn:oid:1.2.250.1.71.4.2.1",
    accession_identifier_system="http://hospital.example.org/accession",
    site_zone=ZoneInfo("Europe/Paris"),
    location_reference="Location/radiology-1",
)


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def request_item(reason: str, reason_code: Dataset | None = None) -> Dataset:
    item = Dataset()
    item.ReasonForTheRequestedProcedure = reason
    if reason_code is not None:
        item.ReasonForRequestedProcedureCodeSequence = [reason_code]
    return item


def through_the_listener(ds: Dataset) -> InstanceRecord:
    """Encode as on the wire, read the header like dicom/scp.py does, extract."""
    return extract_instance(read_header(BytesIO(encode(ds)), ExplicitVRLittleEndian))


def datasets(instances: Iterable[Dataset]) -> list[Dataset]:
    """A study's instances, in the order they are sent."""
    return list(instances)


def snapshot_of(instances: Iterable[Dataset]) -> StudySnapshot:
    """The snapshot the index would hold after receiving ``instances`` in order (its grouping and ordering)."""
    records = [through_the_listener(ds) for ds in instances]
    series_attributes = {}
    instances: dict[str, dict[str, InstanceSnapshot]] = {}
    for record in records:
        series_attributes[record.series.series_uid] = record.series
        instances.setdefault(record.series.series_uid, {})[record.sop_instance_uid] = InstanceSnapshot(
            sop_instance_uid=record.sop_instance_uid,
            sop_class_uid=record.sop_class_uid,
            instance_number=record.instance_number,
            image_laterality=record.image_laterality,
            title=record.title,
        )

    def number_order(number: int | None, uid: str) -> tuple[bool, int, str]:
        return (number is None, number or 0, uid)

    series = [
        SeriesSnapshot(
            attributes=attributes,
            instances=tuple(
                sorted(instances[uid].values(), key=lambda i: number_order(i.instance_number, i.sop_instance_uid))
            ),
        )
        for uid, attributes in series_attributes.items()
    ]
    series.sort(key=lambda s: number_order(s.attributes.series_number, s.attributes.series_uid))
    return StudySnapshot(attributes=records[-1].study, series=tuple(series), change_seq=len(records))


def ct_with_dose_sr_and_presentation_state() -> list[Dataset]:
    """CT chest: two CT series, an X-ray dose SR and a grayscale presentation state; offset -0500."""
    study = ROOT + "1"
    common: dict[str, Any] = {
        "StudyInstanceUID": study,
        "PatientID": "PAT-1001",
        "AccessionNumber": "ACC-1001",
        "StudyDate": "20240715",
        "StudyTime": "083015.123",
        "TimezoneOffsetFromUTC": "-0500",
        "StudyDescription": "CT chest without contrast",
        "ReferringPhysicianName": "Doe^Jane",
        "NameOfPhysiciansReadingStudy": "House^Gregory^^Dr.",
        "ProcedureCodeSequence": [code("24627-2", "LN", "CT Chest")],
        "RequestAttributesSequence": [
            request_item("Persistent cough", code("49727002", "SCT", "Cough")),
        ],
        "SeriesDate": "20240715",
    }

    def instance(series: int, number: int, sop_class: str, modality: str, **extra: Any) -> Dataset:
        return make_dataset(
            **common,
            SeriesInstanceUID=f"{study}.{series}",
            SOPInstanceUID=f"{study}.{series}.{number}",
            SOPClassUID=sop_class,
            Modality=modality,
            SeriesNumber=series,
            InstanceNumber=number,
            **extra,
        )

    ct = {
        "BodyPartExamined": "CHEST",
        "PerformingPhysicianName": "Wilson^James",
        "OperatorsName": "Tech^Tom",
    }
    return datasets(
        [
            *(
                instance(1, n, CT_IMAGE, "CT", SeriesTime="083100", SeriesDescription="Chest 5mm", **ct)
                for n in (1, 2, 3)
            ),
            *(instance(2, n, CT_IMAGE, "CT", SeriesTime="083500", SeriesDescription="Lung 1mm", **ct) for n in (1, 2)),
            instance(
                3,
                1,
                XRAY_DOSE_SR,
                "SR",
                SeriesTime="084500",
                SeriesDescription="Dose Report",
                ConceptNameCodeSequence=[code("113701", "DCM", "X-Ray Radiation Dose Report")],
            ),
            instance(
                4,
                1,
                GRAYSCALE_PR,
                "PR",
                SeriesTime="091000",
                SeriesDescription="Annotations",
                ContentLabel="MEASUREMENTS",
                OperatorsName=None,
            ),
        ]
    )


def bilateral_mammogram() -> list[Dataset]:
    """Screening mammogram: four views of both breasts in one series, a left spot view in a second; no offset."""
    study = ROOT + "2"
    views = [("L", 1), ("R", 2), ("L", 3), ("R", 4)]
    common: dict[str, Any] = {
        "StudyInstanceUID": study,
        "PatientID": "PAT-1002",
        "AccessionNumber": "ACC-1002",
        "StudyDate": "20240115",
        "StudyTime": "141500",
        "StudyDescription": "Screening mammogram",
        "ReferringPhysicianName": "Curie^Marie",
        "ProcedureCodeSequence": [code("24606-6", "LN", "MG Breast Screening")],
        "SOPClassUID": MAMMOGRAPHY_FOR_PRESENTATION,
        "Modality": "MG",
        "BodyPartExamined": "BREAST",
        "OperatorsName": "Rad^Rita",
        "SeriesDate": "20240115",
    }
    return datasets(
        [
            *(
                make_dataset(
                    **common,
                    SeriesInstanceUID=f"{study}.1",
                    SOPInstanceUID=f"{study}.1.{number}",
                    SeriesNumber=1,
                    SeriesTime="141600",
                    SeriesDescription="Screening views",
                    InstanceNumber=number,
                    ImageLaterality=side,
                )
                for side, number in views
            ),
            make_dataset(
                **common,
                SeriesInstanceUID=f"{study}.2",
                SOPInstanceUID=f"{study}.2.1",
                SeriesNumber=2,
                SeriesTime="143000",
                SeriesDescription="Spot compression",
                InstanceNumber=1,
                ImageLaterality="L",
            ),
        ]
    )


def one_series_study(suffix: str, **attributes: Any) -> list[Dataset]:
    """One instance of one series, with the character set and texts given."""
    study = ROOT + suffix
    return datasets(
        [
            make_dataset(
                StudyInstanceUID=study,
                SeriesInstanceUID=f"{study}.1",
                SOPInstanceUID=f"{study}.1.1",
                PatientID=f"PAT-10{suffix.zfill(2)}",
                AccessionNumber=f"ACC-10{suffix.zfill(2)}",
                **attributes,
            )
        ]
    )


def latin1_patient() -> list[Dataset]:
    """ISO_IR 100 names and descriptions; an unmapped body part; no offset, so Paris summer time (+02:00)."""
    return one_series_study(
        "3",
        SpecificCharacterSet="ISO_IR 100",
        SOPClassUID=DIGITAL_XRAY_FOR_PRESENTATION,
        Modality="DX",
        StudyDate="20240612",
        StudyTime="1015",
        SeriesDate="20240612",
        SeriesTime="101700",
        StudyDescription="Thorax pédiatrique",
        SeriesDescription="Face résumée",
        ReferringPhysicianName="Müller^Zoë",
        OperatorsName="Åström^Björn",
        BodyPartExamined="TORSO",  # not an Annex L term (THORAX is: Chest)
        Laterality=None,
    )


def utf8_patient() -> list[Dataset]:
    """ISO_IR 192 (UTF-8) Greek and Cyrillic texts; TimezoneOffsetFromUTC +0300."""
    return one_series_study(
        "4",
        SpecificCharacterSet="ISO_IR 192",
        SOPClassUID=MR_IMAGE,
        Modality="MR",
        StudyDate="20240301",
        StudyTime="170000",
        TimezoneOffsetFromUTC="+0300",
        SeriesDate="20240301",
        SeriesTime="170512",
        StudyDescription="МРТ головного мозга",  # noqa: RUF001 (Cyrillic on purpose)
        SeriesDescription="T2 FLAIR",
        ReferringPhysicianName="Παπαδόπουλος^Νίκος",
        PerformingPhysicianName="Иванова^Анна",
        BodyPartExamined="HEAD",
    )


def japanese_patient() -> list[Dataset]:
    """ISO 2022 IR 87: PN with alphabetic, ideographic and phonetic groups, kanji descriptions; offset +0900."""
    return one_series_study(
        "5",
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
        SOPClassUID=CT_IMAGE,
        Modality="CT",
        StudyDate="20241105",
        StudyTime="093000",
        TimezoneOffsetFromUTC="+0900",
        SeriesDate="20241105",
        SeriesTime="093210",
        StudyDescription="胸部CT",
        SeriesDescription="単純",
        ReferringPhysicianName="Yamada^Tarou=山田^太郎=やまだ^たろう",
        BodyPartExamined="CHEST",
    )


CASES: list[tuple[str, Callable[[], list[Dataset]]]] = [
    ("ct-dose-sr-presentation-state", ct_with_dose_sr_and_presentation_state),
    ("mammogram-bilateral", bilateral_mammogram),
    ("patient-latin1", latin1_patient),
    ("patient-utf8", utf8_patient),
    ("patient-japanese-iso2022", japanese_patient),
]
VERSIONS = ["R4", "R5"]
GOLDEN_PARAMS = [
    pytest.param(name, study, version, id=f"{name}.{version.lower()}") for name, study in CASES for version in VERSIONS
]


def golden_path(name: str, version: str) -> Path:
    return GOLDEN / f"{name}.{version.lower()}.json"


def settings_for(version: str) -> MappingSettings:
    return dataclasses.replace(R4_SETTINGS, fhir_version="R5" if version == "R5" else "R4")


def load(name: str, version: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(golden_path(name, version).read_text(encoding="utf-8"))
    return result


@pytest.mark.parametrize(("name", "study", "version"), GOLDEN_PARAMS)
def test_resource_matches_its_reviewed_golden_file(name: str, study: Callable[[], list[Dataset]], version: str) -> None:
    """From DICOM bytes to resource, the whole ImagingStudy equals the hand-reviewed golden JSON."""
    resource = build_imaging_study(snapshot_of(study()), settings_for(version))
    if os.environ.get("PACS_BRIDGE_WRITE_GOLDEN") == "1":
        text = json.dumps(resource, indent=2, ensure_ascii=False) + "\n"
        golden_path(name, version).write_text(text, encoding="utf-8")

    assert load(name, version) == resource


@pytest.mark.parametrize(("name", "study", "version"), GOLDEN_PARAMS)
def test_golden_file_is_valid_for_its_fhir_version(name: str, study: Callable[[], list[Dataset]], version: str) -> None:
    """fhir.resources accepts each golden file: the R4B models for R4, the default (R5) models for R5."""
    if version == "R4":
        from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

        ImagingStudyR4.model_validate(load(name, version))
    else:
        from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5

        ImagingStudyR5.model_validate(load(name, version))
