"""Series-level endpoint overrides: an endpoint configured with series_modalities (or series_calling_aets) is
referenced from the series of those modalities (or first sent by those calling AE titles) and not from the
study, so that, per the ImagingStudy rules, it overrides a study endpoint of the same connection type for those
series only."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5
from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

from pacs_bridge.config import parse_config
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import build_imaging_study
from pacs_bridge.wiring import mapping_settings
from tests.unit.test_mapping_golden import R4_SETTINGS, ct_with_dose_sr_and_presentation_state, snapshot_of

STUDY_WADO = EndpointSettings(id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://pacs.example.org/rs")
SR_ARCHIVE = EndpointSettings(
    id="sr-archive", connection_type="dicom-wado-rs", address="https://sr.example.org/rs", series_modalities=("SR",)
)
PR_VIEWER = EndpointSettings(
    id="pr-viewer",
    connection_type="dicom-wado-uri",
    address="https://viewer.example.org",
    series_modalities=("PR", "SR"),
)
SETTINGS = dataclasses.replace(R4_SETTINGS, endpoints=(STUDY_WADO, SR_ARCHIVE, PR_VIEWER))


def resource(version: str = "R4") -> dict[str, Any]:
    return build_imaging_study(
        snapshot_of(ct_with_dose_sr_and_presentation_state()), dataclasses.replace(SETTINGS, fhir_version=version)
    )


def test_only_endpoints_without_a_series_rule_are_study_endpoints() -> None:
    """The study references its general endpoints; series-level ones stay off the study."""
    assert resource()["endpoint"] == [{"reference": "Endpoint/pacs-wado-rs"}]


def test_series_reference_the_endpoints_configured_for_their_modality_in_config_order() -> None:
    """SR: its archive and the viewer; PR: the viewer; CT: none (the study endpoint applies)."""
    by_modality: dict[str, list[str]] = {}
    for series in resource()["series"]:
        by_modality[series["modality"]["code"]] = [e["reference"] for e in series.get("endpoint", [])]

    assert by_modality == {
        "CT": [],
        "SR": ["Endpoint/sr-archive", "Endpoint/pr-viewer"],
        "PR": ["Endpoint/pr-viewer"],
    }


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_series_endpoints_are_valid_in_both_releases(version: str) -> None:
    """series.endpoint is a Reference list in R4 and R5 alike."""
    (ImagingStudyR4 if version == "R4" else ImagingStudyR5).model_validate(resource(version))


def endpoint_config(*modalities: str) -> dict[str, Any]:
    """A configuration with one endpoint for the series of ``modalities``."""
    endpoint = {"id": "mg", "connection_type": "dicom-wado-rs", "address": "https://mg.example.org"}
    return {
        "fhir": {"base_url": "http://fhir.example.org"},
        "endpoints": [{**endpoint, "series_modalities": list(modalities)}],
    }


def test_config_series_modalities_reach_the_mapping() -> None:
    """endpoints[].series_modalities becomes EndpointSettings.series_modalities."""
    config = parse_config(endpoint_config("MG"), path="test.yaml")

    assert mapping_settings(config).endpoints[0].series_modalities == ("MG",)


def test_config_refuses_a_modality_that_is_not_a_code() -> None:
    """A lower-case or spaced value is named with its key path."""
    with pytest.raises(ConfigError) as caught:
        parse_config(endpoint_config("m g"), path="test.yaml")

    assert "at 'endpoints[0].series_modalities'" in str(caught.value)


CARDIO_ARCHIVE = EndpointSettings(
    id="cardio",
    connection_type="dicom-wado-rs",
    address="https://cardio.example.org/rs",
    series_calling_aets=("CARDIO",),
)


def sent_by(snapshot: Any, senders: dict[str, str]) -> Any:
    """``snapshot`` with each series' sending AE title set from ``senders`` (modality -> AE title)."""
    series = tuple(
        dataclasses.replace(
            one,
            attributes=dataclasses.replace(one.attributes, sending_ae_title=senders.get(one.attributes.modality, "")),
        )
        for one in snapshot.series
    )
    return dataclasses.replace(snapshot, series=series)


def test_series_sent_by_a_configured_calling_ae_reference_its_endpoint() -> None:
    """The CT series came from CARDIO, the SR and PR from elsewhere: only the CT series names the CARDIO archive."""
    snapshot = sent_by(snapshot_of(ct_with_dose_sr_and_presentation_state()), {"CT": "CARDIO", "SR": "WORKSTATION"})
    settings = dataclasses.replace(R4_SETTINGS, endpoints=(STUDY_WADO, CARDIO_ARCHIVE))

    built = build_imaging_study(snapshot, settings)

    assert built["endpoint"] == [{"reference": "Endpoint/pacs-wado-rs"}]
    by_modality = {s["modality"]["code"]: [e["reference"] for e in s.get("endpoint", [])] for s in built["series"]}
    assert by_modality == {"CT": ["Endpoint/cardio"], "SR": [], "PR": []}
    ImagingStudyR4.model_validate(built)


def test_config_series_calling_aets_reach_the_mapping() -> None:
    """endpoints[].series_calling_aets becomes EndpointSettings.series_calling_aets, padded spaces dropped."""
    config = parse_config(
        {
            "fhir": {"base_url": "http://fhir.example.org"},
            "endpoints": [
                {
                    "id": "c",
                    "connection_type": "dicom-wado-rs",
                    "address": "https://c",
                    "series_calling_aets": ["CARDIO "],
                }
            ],
        },
        path="test.yaml",
    )

    assert mapping_settings(config).endpoints[0].series_calling_aets == ("CARDIO",)


@pytest.mark.parametrize("ae_title", ["", "   ", "A\\B", "SEVENTEEN_CHARS_X"])
def test_config_refuses_a_calling_ae_that_is_not_an_ae_title(ae_title: str) -> None:
    data = {
        "fhir": {"base_url": "http://fhir.example.org"},
        "endpoints": [
            {"id": "c", "connection_type": "dicom-wado-rs", "address": "https://c", "series_calling_aets": [ae_title]}
        ],
    }

    with pytest.raises(ConfigError) as caught:
        parse_config(data, path="test.yaml")

    assert "at 'endpoints[0].series_calling_aets" in str(caught.value)


@pytest.mark.parametrize("rule", [{"series_modalities": ["PR"]}, {"series_calling_aets": ["VIEWER"]}])
def test_config_refuses_a_series_level_iid_endpoint(rule: dict[str, list[str]]) -> None:
    """IHE IID launches a viewer on a study: the ImagingStudy rules use it at the study level only (issue 20)."""
    data = {
        "fhir": {"base_url": "http://fhir.example.org"},
        "endpoints": [{"id": "viewer", "connection_type": "ihe-iid", "address": "https://viewer.example.org", **rule}],
    }

    with pytest.raises(ConfigError) as caught:
        parse_config(data, path="test.yaml")

    assert "at 'endpoints[0]': endpoint viewer: an ihe-iid endpoint (IHE Invoke Image Display) is for the study" in str(
        caught.value
    )


def test_config_accepts_a_study_level_iid_endpoint() -> None:
    data = {
        "fhir": {"base_url": "http://fhir.example.org"},
        "endpoints": [{"id": "viewer", "connection_type": "ihe-iid", "address": "https://viewer.example.org"}],
    }

    assert mapping_settings(parse_config(data, path="test.yaml")).endpoints[0].connection_type == "ihe-iid"
