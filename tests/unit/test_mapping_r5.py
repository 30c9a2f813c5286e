"""R5 from the same core: the builder's version-specific shaping, the R5 Endpoint, and the configuration that
selects them. Every R5 resource here is validated with the fhir.resources default (R5) models."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fhir.resources.endpoint import Endpoint as EndpointR5
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5

from pacs_bridge.config import parse_config
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.endpoint import EndpointSettings, build_endpoint
from pacs_bridge.fhir.imaging_study import build_imaging_study
from tests.unit.test_imaging_study import SETTINGS, ct_one_series_snapshot, fully_described_snapshot

R5 = dataclasses.replace(SETTINGS, fhir_version="R5", location_reference="Location/radiology-1")
R4 = dataclasses.replace(R5, fhir_version="R4")
SCT = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def test_r5_reshapes_modality_procedure_reason_body_site_and_laterality() -> None:
    """CodeableConcept modality and laterality, CodeableReference procedure, reason and bodySite."""
    resource = build_imaging_study(fully_described_snapshot(), R5)
    series = resource["series"][0]

    assert resource["modality"] == [{"coding": [{"system": DCM, "code": "CT"}]}]
    assert series["modality"] == {"coding": [{"system": DCM, "code": "CT"}]}
    assert resource["procedure"] == [
        {"concept": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}], "text": "CT Chest"}},
        {"concept": {"text": "CT thorax, local code"}},
    ]
    assert resource["reason"] == [
        {"concept": {"coding": [{"system": SCT, "code": "49727002"}], "text": "Persistent cough"}},
    ]
    assert series["bodySite"] == {"concept": {"coding": [{"system": SCT, "code": "816094009"}], "text": "Chest"}}
    assert series["laterality"] == {"coding": [{"system": SCT, "code": "24028007", "display": "Right"}]}


def test_r5_carries_the_reading_physicians_in_the_cross_version_extension() -> None:
    """R5 dropped interpreter (its R4 -> R5 map names no target); the names are not lost: each is an R4
    ImagingStudy.interpreter cross-version extension with the same Reference (issue 20)."""
    resource = build_imaging_study(fully_described_snapshot(), R5)

    assert resource["extension"] == [
        {
            "url": "http://hl7.org/fhir/4.0/StructureDefinition/extension-ImagingStudy.interpreter",
            "valueReference": {"type": "Practitioner", "display": "Dr. Gregory House"},
        }
    ]
    assert "extension" not in build_imaging_study(fully_described_snapshot(), R4), "R4 has the element itself"
    ImagingStudyR5.model_validate(resource)


def test_r5_has_no_interpreter_and_no_r4_only_element_names() -> None:
    """R5 dropped interpreter; procedureCode and reasonCode are named procedure and reason."""
    resource = build_imaging_study(fully_described_snapshot(), R5)

    assert not {"interpreter", "procedureCode", "reasonCode"} & set(resource)


def test_r5_keeps_every_element_r5_shares_with_r4() -> None:
    """Identifier, subject, dates, basedOn, referrer, endpoint, counts, performers, instances: as in R4."""
    r4 = build_imaging_study(fully_described_snapshot(), dataclasses.replace(R5, fhir_version="R4"))
    r5 = build_imaging_study(fully_described_snapshot(), R5)
    shared = ["id", "identifier", "status", "subject", "started", "basedOn", "referrer", "endpoint", "location"]
    shared += ["numberOfSeries", "numberOfInstances", "description"]

    assert {key: r5[key] for key in shared} == {key: r4[key] for key in shared}
    for key in ("uid", "number", "description", "numberOfInstances", "started", "performer", "instance"):
        assert r5["series"][0][key] == r4["series"][0][key]


def with_body_part(term: str) -> Any:
    snapshot = fully_described_snapshot()
    series = snapshot.series[0]
    return dataclasses.replace(
        snapshot,
        series=(
            dataclasses.replace(series, attributes=dataclasses.replace(series.attributes, body_part_examined=term)),
        ),
    )


@pytest.mark.parametrize(
    "term",
    [
        "TORSO",  # not an Annex L term
        "ENDORECTAL",  # an Annex L term whose code (34402009 Rectum) means something else
    ],
)
def test_unmapped_body_part_is_a_text_concept_in_r5_and_left_out_of_r4(term: str) -> None:
    """R5 bodySite is a CodeableReference: an unmapped term becomes concept.text. R4 bodySite is a Coding, which
    has no text: a Coding with a display alone means nothing and no search finds it, so there is none (issue 20)."""
    assert build_imaging_study(with_body_part(term), R5)["series"][0]["bodySite"] == {"concept": {"text": term}}
    assert "bodySite" not in build_imaging_study(with_body_part(term), R4)["series"][0]


@pytest.mark.parametrize("snapshot", [fully_described_snapshot, ct_one_series_snapshot])
def test_r5_resource_is_valid_according_to_the_fhir_resources_r5_models(snapshot: Any) -> None:
    """The default (R5) fhir.resources ImagingStudy model accepts the R5 resource."""
    ImagingStudyR5.model_validate(build_imaging_study(snapshot(), R5))


@pytest.mark.parametrize("connection_type", ["dicom-wado-rs", "dicom-wado-uri", "ihe-iid"])
def test_r5_endpoint_is_valid_and_carries_its_payload(connection_type: str) -> None:
    """R5 Endpoint: connectionType is a list of CodeableConcept, payload holds type and MIME types."""
    settings = EndpointSettings(id="pacs", connection_type=connection_type, address="https://pacs.example.org/x/")

    resource = build_endpoint(settings, fhir_version="R5")

    EndpointR5.model_validate(resource)
    assert resource["connectionType"][0]["coding"][0]["code"] == connection_type
    assert resource["payload"][0]["mimeType"]
    assert resource["address"] == "https://pacs.example.org/x"


def test_config_accepts_r5_and_a_location_reference() -> None:
    """fhir.version R5 and site.location are valid configuration."""
    config = parse_config(
        {"fhir": {"base_url": "http://fhir.example.org", "version": "R5"}, "site": {"location": "Location/ct-1"}},
        path="test.yaml",
    )

    assert (config.fhir.version, config.site.location) == ("R5", "Location/ct-1")


@pytest.mark.parametrize(
    ("section", "value", "where"),
    [
        ("fhir", {"base_url": "http://fhir.example.org", "version": "R6"}, "fhir.version"),  # no such release
        ("site", {"location": "radiology-1"}, "site.location"),  # not a Location reference
    ],
)
def test_config_rejects_an_unknown_version_or_a_bad_location(section: str, value: dict[str, str], where: str) -> None:
    """The problem names the key path."""
    data: dict[str, Any] = {"fhir": {"base_url": "http://fhir.example.org"}, section: value}

    with pytest.raises(ConfigError) as caught:
        parse_config(data, path="test.yaml")

    assert f"'{where}'" in str(caught.value)


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_without_instances_series_keep_their_counts_and_the_resource_stays_valid(version: str) -> None:
    """publish.include_instances false: no instance lists, every count still sent, still valid."""
    from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

    settings = dataclasses.replace(R5, fhir_version=version, include_instances=False)

    resource = build_imaging_study(fully_described_snapshot(), settings)

    assert all("instance" not in series for series in resource["series"])
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (1, 3)
    assert resource["series"][0]["numberOfInstances"] == 3
    (ImagingStudyR4 if version == "R4" else ImagingStudyR5).model_validate(resource)


def test_config_include_instances_defaults_to_true_and_reaches_the_mapping() -> None:
    """The key is optional (true); false reaches MappingSettings through the service wiring."""
    from pacs_bridge.wiring import mapping_settings

    default = parse_config({"fhir": {"base_url": "http://fhir.example.org"}}, path="test.yaml")
    off = parse_config(
        {"fhir": {"base_url": "http://fhir.example.org"}, "publish": {"include_instances": False}}, path="test.yaml"
    )

    assert (default.publish.include_instances, mapping_settings(default).include_instances) == (True, True)
    assert mapping_settings(off).include_instances is False
