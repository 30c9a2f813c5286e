"""Unit tests for ``pacs_bridge.fhir.imaging_study``: StudySnapshot -> one R4 ImagingStudy, and its content hash.

The two golden files were generated once from the builder and then read field by field against
/work/shared/spec/imagingstudy-dicom-notes.md and the R4 ImagingStudy structure (4.0.1). If the builder changes
on purpose, regenerate them and review the diff the same way; never bless a diff unread.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MISSING_PATIENT_ID_DISPLAY, MappingSettings, build_imaging_study
from pacs_bridge.fhir.resource import content_hash
from pacs_bridge.records import (
    CodedConcept,
    InstanceSnapshot,
    RequestedReason,
    SeriesAttributes,
    SeriesSnapshot,
    StudyAttributes,
    StudySnapshot,
)

GOLDEN = Path(__file__).parent / "golden"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"

STUDY_UID = "1.2.826.0.1.3680043.10.1482.1"
MULTI_STUDY_UID = "1.2.826.0.1.3680043.10.1482.7"

WADO_RS = EndpointSettings(
    id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://pacs.example.org/dicom-web"
)
WADO_URI = EndpointSettings(
    id="pacs-wado-uri", connection_type="dicom-wado-uri", address="https://pacs.example.org/wado"
)

SETTINGS = MappingSettings(
    endpoints=(WADO_RS,),
    patient_identifier_system="urn:oid:1.2.250.1.71.4.2.1",
    accession_identifier_system="http://hospital.example.org/accession",
    site_zone=ZoneInfo("Europe/Paris"),
)


def ct_instances(series_uid: str, count: int) -> tuple[InstanceSnapshot, ...]:
    return tuple(
        InstanceSnapshot(sop_instance_uid=f"{series_uid}.{n}", sop_class_uid=CT_IMAGE_STORAGE, instance_number=n)
        for n in range(1, count + 1)
    )


def ct_one_series_snapshot() -> StudySnapshot:
    """A CT study of one series with three images; no TimezoneOffsetFromUTC, so the site zone applies."""
    series_uid = f"{STUDY_UID}.2"
    return StudySnapshot(
        attributes=StudyAttributes(
            study_uid=STUDY_UID,
            patient_id="PAT-0001",
            accession_number="ACC-0001",
            study_date="20240315",
            study_time="101530",
            study_description="CT chest",
        ),
        series=(
            SeriesSnapshot(
                attributes=SeriesAttributes(
                    series_uid=series_uid,
                    modality="CT",
                    series_number=1,
                    series_description="Axial 5mm",
                    series_date="20240315",
                    series_time="101600",
                ),
                instances=ct_instances(series_uid, 3),
            ),
        ),
        change_seq=3,
    )


def multi_series_snapshot() -> StudySnapshot:
    """Two CT series, an MR series and an SR without number, date or instance number; offset -0500 given."""
    return StudySnapshot(
        attributes=StudyAttributes(
            study_uid=MULTI_STUDY_UID,
            patient_id="PAT-0002",
            issuer_of_patient_id="HOSP-A",
            accession_number="ACC-0002",
            study_date="20240715",
            study_time="083015.123",
            timezone_offset="-0500",
            study_description="CT/MR abdomen",
        ),
        series=(
            SeriesSnapshot(
                attributes=SeriesAttributes(
                    series_uid=f"{MULTI_STUDY_UID}.1",
                    modality="CT",
                    series_number=1,
                    series_description="Abdomen 1mm",
                    series_date="20240715",
                    series_time="083100",
                ),
                instances=ct_instances(f"{MULTI_STUDY_UID}.1", 2),
            ),
            SeriesSnapshot(
                attributes=SeriesAttributes(
                    series_uid=f"{MULTI_STUDY_UID}.2",
                    modality="CT",
                    series_number=2,
                    series_date="20240715",
                    series_time="0835",
                ),
                instances=ct_instances(f"{MULTI_STUDY_UID}.2", 1),
            ),
            SeriesSnapshot(
                attributes=SeriesAttributes(
                    series_uid=f"{MULTI_STUDY_UID}.3",
                    modality="MR",
                    series_number=3,
                    series_description="T2 axial",
                    series_date="20240715",
                    series_time="091000",
                ),
                instances=(
                    InstanceSnapshot(
                        sop_instance_uid=f"{MULTI_STUDY_UID}.3.1",
                        sop_class_uid=MR_IMAGE_STORAGE,
                        instance_number=1,
                    ),
                ),
            ),
            SeriesSnapshot(
                attributes=SeriesAttributes(series_uid=f"{MULTI_STUDY_UID}.4", modality="SR"),
                instances=(
                    InstanceSnapshot(
                        sop_instance_uid=f"{MULTI_STUDY_UID}.4.1",
                        sop_class_uid=COMPREHENSIVE_SR_STORAGE,
                    ),
                ),
            ),
        ),
        change_seq=9,
    )


MULTI_SETTINGS = dataclasses.replace(SETTINGS, endpoints=(WADO_RS, WADO_URI))

GOLDEN_CASES = [
    # one CT series of three images, no offset (Europe/Paris winter: +01:00), one WADO-RS endpoint
    pytest.param("ct-one-series.r4.json", ct_one_series_snapshot, SETTINGS, id="ct-one-series"),
    # CT, CT, MR and a bare SR (no number, date or instance number), offset -0500, two endpoints
    pytest.param("multi-series.r4.json", multi_series_snapshot, MULTI_SETTINGS, id="multi-series"),
]


def load_golden(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((GOLDEN / name).read_text(encoding="utf-8"))
    return result


@pytest.mark.parametrize(("golden", "snapshot", "settings"), GOLDEN_CASES)
def test_build_imaging_study_matches_the_reviewed_golden_resource(
    golden: str, snapshot: Any, settings: MappingSettings
) -> None:
    """The whole resource equals the hand-reviewed golden JSON, key for key."""
    expected = load_golden(golden)

    assert expected == build_imaging_study(snapshot(), settings)


@pytest.mark.parametrize(
    "golden",
    [
        "ct-one-series.r4.json",  # the one-series CT
        "multi-series.r4.json",  # the multi-series study with optional elements left out
    ],
)
def test_golden_resource_is_valid_r4_according_to_fhir_resources(golden: str) -> None:
    """The fhir.resources R4B model (ImagingStudy unchanged from R4) accepts each golden resource."""
    pytest.importorskip("fhir.resources")
    from fhir.resources.R4B.imagingstudy import ImagingStudy

    resource = load_golden(golden)

    parsed = ImagingStudy.model_validate(resource)

    assert parsed.id == resource["id"]
    assert len(parsed.series or []) == resource["numberOfSeries"]


def test_same_snapshot_gives_the_same_content_hash() -> None:
    """Deterministic mapping: building twice gives equal resources and equal hashes."""
    first = build_imaging_study(multi_series_snapshot(), MULTI_SETTINGS)
    second = build_imaging_study(multi_series_snapshot(), MULTI_SETTINGS)

    assert first == second
    assert content_hash(first) == content_hash(second)


def test_one_more_instance_changes_the_content_hash() -> None:
    """A new instance in a series is a change that must be published."""
    snapshot = ct_one_series_snapshot()
    series = snapshot.series[0]
    grown = dataclasses.replace(
        snapshot,
        series=(dataclasses.replace(series, instances=ct_instances(series.attributes.series_uid, 4)),),
    )

    assert content_hash(build_imaging_study(grown, SETTINGS)) != content_hash(build_imaging_study(snapshot, SETTINGS))


def test_content_hash_ignores_key_order() -> None:
    """Two dicts with equal content but different insertion order hash the same."""
    resource = build_imaging_study(multi_series_snapshot(), MULTI_SETTINGS)
    reordered = json.loads(json.dumps(resource, sort_keys=True))
    assert list(reordered) != list(resource)

    assert content_hash(reordered) == content_hash(resource)


def test_content_hash_is_a_sha256_hex_digest() -> None:
    """The hash fits the published_hash column: 64 lowercase hex characters."""
    digest = content_hash(build_imaging_study(ct_one_series_snapshot(), SETTINGS))

    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_missing_patient_id_gives_a_subject_with_display_only() -> None:
    """subject is 1..1 in FHIR; without PatientID it says so instead of inventing an identifier."""
    snapshot = ct_one_series_snapshot()
    anonymous = dataclasses.replace(snapshot, attributes=dataclasses.replace(snapshot.attributes, patient_id=""))

    resource = build_imaging_study(anonymous, SETTINGS)

    assert resource["subject"] == {"type": "Patient", "display": MISSING_PATIENT_ID_DISPLAY}


def test_patient_identifier_without_configured_system_has_value_only() -> None:
    """No configured system: the identifier carries the value alone rather than an empty system."""
    resource = build_imaging_study(ct_one_series_snapshot(), MappingSettings())

    assert resource["subject"] == {"type": "Patient", "identifier": {"value": "PAT-0001"}}


def test_no_accession_number_gives_no_based_on() -> None:
    """basedOn only ever carries the accession; without one the element is absent, not empty."""
    snapshot = ct_one_series_snapshot()
    without = dataclasses.replace(snapshot, attributes=dataclasses.replace(snapshot.attributes, accession_number=""))

    resource = build_imaging_study(without, SETTINGS)

    assert "basedOn" not in resource


def test_no_configured_endpoint_gives_no_endpoint_element() -> None:
    """Without endpoints in the configuration the resource references none (no empty list)."""
    resource = build_imaging_study(ct_one_series_snapshot(), dataclasses.replace(SETTINGS, endpoints=()))

    assert "endpoint" not in resource


def test_study_without_series_has_zero_counts_and_no_series_or_modality() -> None:
    """An empty snapshot still gives a valid resource: counts 0, no empty arrays."""
    snapshot = dataclasses.replace(ct_one_series_snapshot(), series=())

    resource = build_imaging_study(snapshot, SETTINGS)

    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (0, 0)
    assert "series" not in resource
    assert "modality" not in resource


FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@pytest.mark.parametrize(
    "study_uid",
    [
        "not a uid",  # spaces
        "ABC_123",  # underscore is not allowed in a FHIR id
        "12345",  # digits without a dot: not taken as a UID
        "1.2." + "3" * 70,  # longer than a FHIR id may be
        "é.1",  # non-ASCII
    ],
)
def test_id_for_a_non_uid_study_uid_is_a_valid_deterministic_fhir_id(study_uid: str) -> None:
    """Even a value extract would refuse maps to a valid FHIR id, the same one every time."""
    snapshot = ct_one_series_snapshot()
    odd = dataclasses.replace(snapshot, attributes=dataclasses.replace(snapshot.attributes, study_uid=study_uid))

    first = build_imaging_study(odd, SETTINGS)["id"]
    second = build_imaging_study(odd, SETTINGS)["id"]

    assert FHIR_ID.fullmatch(first)
    assert first == second
    assert first != study_uid


def test_id_for_a_valid_uid_is_the_uid_itself() -> None:
    """A DICOM UID is already a valid FHIR id, kept as is so operators can find it by eye."""
    assert build_imaging_study(ct_one_series_snapshot(), SETTINGS)["id"] == STUDY_UID


# ---- every element the DICOM mapping covers (issue 3) ------------------------------------------------------

LN_CT_CHEST = CodedConcept(code="24627-2", scheme="LN", meaning="CT Chest")
LOCAL_CT = CodedConcept(code="CTTHX", scheme="99ORDERS", meaning="CT thorax, local code")
COUGH = CodedConcept(code="49727002", scheme="SCT", meaning="Cough")


def fully_described_snapshot() -> StudySnapshot:
    """The one-series CT with every attribute the mapping reads: names, codes, body part, laterality, titles."""
    snapshot = ct_one_series_snapshot()
    series = snapshot.series[0]
    return dataclasses.replace(
        snapshot,
        attributes=dataclasses.replace(
            snapshot.attributes,
            referring_physician="Doe^Jane",
            reading_physicians=("House^Gregory^^Dr.",),
            procedure_codes=(LN_CT_CHEST, LOCAL_CT),
            reasons=(RequestedReason(text="Persistent cough", codes=(COUGH,)),),
        ),
        series=(
            dataclasses.replace(
                series,
                attributes=dataclasses.replace(
                    series.attributes,
                    body_part_examined="CHEST",
                    laterality="",
                    performing_physicians=("Wilson^James",),
                    operators=("Tech^Tom",),
                ),
                instances=tuple(
                    dataclasses.replace(instance, image_laterality="R", title="Axial" if n == 0 else "")
                    for n, instance in enumerate(series.instances)
                ),
            ),
        ),
    )


def test_study_level_people_codes_and_reasons_are_mapped() -> None:
    """referrer, interpreter, procedureCode (coded or text) and reasonCode (one concept per reason, its code and
    its text together)."""
    resource = build_imaging_study(fully_described_snapshot(), SETTINGS)

    assert resource["referrer"] == {"type": "Practitioner", "display": "Jane Doe"}
    assert resource["interpreter"] == [{"type": "Practitioner", "display": "Dr. Gregory House"}]
    assert resource["procedureCode"] == [
        {"coding": [{"system": "http://loinc.org", "code": "24627-2"}], "text": "CT Chest"},
        {"text": "CT thorax, local code"},
    ]
    assert resource["reasonCode"] == [
        {"coding": [{"system": "http://snomed.info/sct", "code": "49727002"}], "text": "Persistent cough"},
    ]


def test_series_body_site_laterality_and_performers_are_mapped() -> None:
    """bodySite from Annex L (no display: DICOM's words are not SNOMED CT's), laterality from the images,
    performers with their function codes."""
    series = build_imaging_study(fully_described_snapshot(), SETTINGS)["series"][0]

    assert series["bodySite"] == {"system": "http://snomed.info/sct", "code": "816094009"}
    assert series["laterality"] == {"system": "http://snomed.info/sct", "code": "24028007", "display": "Right"}
    participation = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
    assert series["performer"] == [
        {
            "function": {"coding": [{"system": participation, "code": "PRF", "display": "performer"}]},
            "actor": {"type": "Practitioner", "display": "James Wilson"},
        },
        {
            "function": {"coding": [{"system": participation, "code": "SPRF", "display": "secondary performer"}]},
            "actor": {"type": "Practitioner", "display": "Tom Tech"},
        },
    ]
    assert [instance.get("title") for instance in series["instance"]] == ["Axial", None, None]


def test_location_appears_only_when_configured() -> None:
    """ImagingStudy.location is the configured Location reference, absent otherwise."""
    snapshot = fully_described_snapshot()
    located = dataclasses.replace(SETTINGS, location_reference="Location/radiology-1")

    assert "location" not in build_imaging_study(snapshot, SETTINGS)
    assert build_imaging_study(snapshot, located)["location"] == {"reference": "Location/radiology-1"}


def test_snapshot_without_the_new_attributes_maps_none_of_their_elements() -> None:
    """No names, codes, body part or laterality: none of their elements, not even empty ones."""
    resource = build_imaging_study(ct_one_series_snapshot(), SETTINGS)

    assert not {"referrer", "interpreter", "procedureCode", "reasonCode", "location"} & set(resource)
    assert not {"bodySite", "laterality", "performer"} & set(resource["series"][0])


def test_fully_described_resource_is_valid_r4_according_to_fhir_resources() -> None:
    """The fhir.resources R4B model accepts the resource with every mapped element."""
    from fhir.resources.R4B.imagingstudy import ImagingStudy

    located = dataclasses.replace(SETTINGS, location_reference="Location/radiology-1")

    ImagingStudy.model_validate(build_imaging_study(fully_described_snapshot(), located))
