"""fhir.profile ihe-imr: each ImagingStudy claims the IHE IMR ImagingStudy profile and is checked against what
that profile adds to R4 before it is sent; the configuration refuses combinations that cannot conform."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

from pacs_bridge.config import parse_config
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.endpoint import IHE_IMR_IMAGING_STUDY_ENDPOINT, EndpointSettings, build_endpoint
from pacs_bridge.fhir.imaging_study import IHE_IMR_IMAGING_STUDY, build_imaging_study
from pacs_bridge.fhir.validation import resource_problems
from pacs_bridge.records import StudySnapshot
from pacs_bridge.wiring import mapping_settings
from tests.unit.test_mapping_golden import R4_SETTINGS, ct_with_dose_sr_and_presentation_state, snapshot_of

IMR = dataclasses.replace(R4_SETTINGS, profile="ihe-imr")
ENDPOINT_TYPES = {"pacs-wado-rs": "dicom-wado-rs", "pacs-iid": "ihe-iid"}


def ct_study() -> StudySnapshot:
    return snapshot_of(ct_with_dose_sr_and_presentation_state())


def imr_problems(snapshot: StudySnapshot, settings: Any = IMR) -> list[str]:
    resource = build_imaging_study(snapshot, settings)
    return [p for p in resource_problems(resource, fhir_version="R4", endpoint_types=ENDPOINT_TYPES) if "IMR" in p]


def test_imr_study_claims_the_profile_and_conforms() -> None:
    """meta.profile names the IMR profile; the R4 models and the IMR checks find nothing."""
    resource = build_imaging_study(ct_study(), IMR)

    assert resource["meta"] == {"profile": [IHE_IMR_IMAGING_STUDY]}
    assert resource_problems(resource, fhir_version="R4", endpoint_types=ENDPOINT_TYPES) == []
    ImagingStudyR4.model_validate(resource)


def test_without_a_profile_no_meta_is_sent() -> None:
    """The default claims nothing (and the goldens keep their shape)."""
    assert "meta" not in build_imaging_study(ct_study(), R4_SETTINGS)


def without(snapshot: StudySnapshot, **changes: Any) -> StudySnapshot:
    return dataclasses.replace(snapshot, attributes=dataclasses.replace(snapshot.attributes, **changes))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        # started 1..1: no StudyDate, no started
        (lambda s, st: (without(s, study_date=""), st), "started is required"),
        # modality 1..*: a study with no series
        (lambda s, st: (dataclasses.replace(s, series=()), st), "modality is required"),
        # endpoint 1..*: no endpoint configured
        (lambda s, st: (s, dataclasses.replace(st, endpoints=())), "endpoint is required"),
        # the referenced endpoint is not WADO-RS
        (
            lambda s, st: (
                s,
                dataclasses.replace(
                    st, endpoints=(EndpointSettings(id="pacs-iid", connection_type="ihe-iid", address="https://v"),)
                ),
            ),
            "no referenced Endpoint is dicom-wado-rs",
        ),
    ],
)
def test_each_imr_constraint_is_checked_before_sending(change: Any, fragment: str) -> None:
    """A study that cannot conform gets a problem naming the IMR constraint, so it is not sent."""
    snapshot, settings = change(ct_study(), IMR)

    problems = imr_problems(snapshot, settings)

    assert any(fragment in problem for problem in problems), problems


def test_imr_checks_apply_only_to_resources_claiming_the_profile() -> None:
    """Without the claim a study without StudyDate is valid R4, as before."""
    resource = build_imaging_study(without(ct_study(), study_date=""), R4_SETTINGS)

    assert resource_problems(resource, fhir_version="R4", endpoint_types=ENDPOINT_TYPES) == []


BASE: dict[str, Any] = {
    "fhir": {"base_url": "http://fhir.example.org", "profile": "ihe-imr"},
    "endpoints": [{"id": "pacs", "connection_type": "dicom-wado-rs", "address": "https://pacs.example.org/rs"}],
}


def test_config_ihe_imr_reaches_the_mapping() -> None:
    """fhir.profile ihe-imr with R4 and a WADO-RS endpoint is valid and reaches MappingSettings."""
    assert mapping_settings(parse_config(BASE, path="test.yaml")).profile == "ihe-imr"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            {**BASE, "fhir": {**BASE["fhir"], "version": "R5"}},
            "at 'fhir.profile': ihe-imr is an R4 profile",
        ),  # IMR 1.1.0 profiles R4
        (
            {**BASE, "endpoints": [{"id": "v", "connection_type": "ihe-iid", "address": "https://v.example.org"}]},
            "at 'endpoints': fhir.profile ihe-imr needs a study-level endpoint",
        ),  # no WADO-RS endpoint to retrieve images with
        (
            {**BASE, "endpoints": [{**BASE["endpoints"][0], "series_modalities": ["MG"]}]},
            "at 'endpoints': fhir.profile ihe-imr needs a study-level endpoint",
        ),  # WADO-RS for some series only: the study would have no endpoint
        ({**BASE, "fhir": {**BASE["fhir"], "profile": "ihe-xds"}}, "at 'fhir.profile'"),  # unknown profile
        (
            {
                **BASE,
                "endpoints": [
                    *BASE["endpoints"],
                    {"id": "uri", "connection_type": "dicom-wado-uri", "address": "https://pacs.example.org/wado"},
                ],
            },
            "at 'endpoints[1].connection_type': the IHE IMR study endpoints may only be dicom-wado-rs or ihe-iid",
        ),  # a study-level WADO-URI endpoint is no Imaging Study Endpoint
    ],
)
def test_config_refuses_what_cannot_conform(data: dict[str, Any], fragment: str) -> None:
    """Each problem names its key path."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path="test.yaml")

    assert fragment in str(caught.value)


def test_a_series_level_wado_uri_endpoint_is_allowed_beside_imr() -> None:
    """Only the study's endpoints must be IMR Imaging Study Endpoints; a series one may be anything."""
    data = {
        **BASE,
        "endpoints": [
            *BASE["endpoints"],
            {"id": "uri", "connection_type": "dicom-wado-uri", "address": "https://p", "series_modalities": ["SR"]},
        ],
    }

    assert mapping_settings(parse_config(data, path="test.yaml")).profile == "ihe-imr"


@pytest.mark.parametrize(
    "settings",
    [
        EndpointSettings(id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://p"),
        EndpointSettings(id="pacs-iid", connection_type="ihe-iid", address="https://v"),
        EndpointSettings(id="mg", connection_type="dicom-wado-rs", address="https://p", series_modalities=("MG",)),
    ],
    ids=["study-wado-rs", "study-iid", "series-wado-rs"],
)
def test_imr_endpoints_conform_to_the_imaging_study_endpoint_profile(settings: EndpointSettings) -> None:
    """What build_endpoint makes in ihe-imr mode passes the R4 models and the IMR Endpoint checks."""
    resource = build_endpoint(settings, profile="ihe-imr")

    assert resource["meta"] == {"profile": [IHE_IMR_IMAGING_STUDY_ENDPOINT]}
    assert resource_problems(resource, fhir_version="R4") == []


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda r: r | {"payloadType": [{"text": "DICOM WADO-RS"}]}, "payloadType must occur once"),
        (lambda r: r | {"payloadType": r["payloadType"] * 2}, "payloadType must occur once"),
        (
            lambda r: r | {"connectionType": {**r["connectionType"], "code": "dicom-wado-uri"}},
            "connectionType 'dicom-wado-uri' is not one of",
        ),
    ],
)
def test_each_imr_endpoint_constraint_is_checked_before_sending(change: Any, fragment: str) -> None:
    """An Endpoint claiming the IMR profile but breaking it gets a problem, so it is not sent."""
    resource = change(
        build_endpoint(
            EndpointSettings(id="pacs-wado-rs", connection_type="dicom-wado-rs", address="https://p"),
            profile="ihe-imr",
        )
    )

    problems = resource_problems(resource, fhir_version="R4")

    assert any(fragment in problem for problem in problems), problems


def test_imr_study_referencing_a_wado_uri_endpoint_is_not_sent() -> None:
    """The study's endpoints must all be Imaging Study Endpoints (WADO-RS or IID)."""
    uri = EndpointSettings(id="uri", connection_type="dicom-wado-uri", address="https://p")
    settings = dataclasses.replace(IMR, endpoints=(*IMR.endpoints, uri))
    resource = build_imaging_study(ct_study(), settings)

    problems = resource_problems(
        resource, fhir_version="R4", endpoint_types={**ENDPOINT_TYPES, "uri": "dicom-wado-uri"}
    )

    assert "IHE IMR: endpoint Endpoint/uri is dicom-wado-uri, not an Imaging Study Endpoint" in problems
