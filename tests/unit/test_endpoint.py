"""Unit tests for ``pacs_bridge.fhir.endpoint.build_endpoint``: configured endpoint -> R4 Endpoint resource."""

from __future__ import annotations

import pytest

from pacs_bridge.fhir.endpoint import (
    CONNECTION_TYPES,
    IHE_IMR_IMAGING_STUDY_ENDPOINT,
    EndpointSettings,
    build_endpoint,
)

# (code, display in the R4 endpoint-connection-type CodeSystem, payload MIME type we advertise)
CONNECTION_TYPE_ROWS = [
    ("dicom-wado-rs", "DICOM WADO-RS", "application/dicom"),  # retrieve studies/series/instances over REST
    ("dicom-wado-uri", "DICOM WADO-URI", "application/dicom"),  # retrieve instances by query parameters
    ("dicom-qido-rs", "DICOM QIDO-RS", "application/dicom+json"),  # query: answers are DICOM JSON
    ("dicom-stow-rs", "DICOM STOW-RS", "application/dicom"),  # store instances over REST
    ("ihe-iid", "IHE IID", "text/html"),  # Invoke Image Display: a viewer page
]


def test_the_table_covers_every_supported_connection_type() -> None:
    """A connection type added to CONNECTION_TYPES must get a row in this test's table."""
    assert sorted(code for code, _, _ in CONNECTION_TYPE_ROWS) == sorted(CONNECTION_TYPES)


@pytest.mark.parametrize(("code", "display", "mime_type"), CONNECTION_TYPE_ROWS)
def test_build_endpoint_gives_the_r4_endpoint_for_each_connection_type(code: str, display: str, mime_type: str) -> None:
    """The whole resource: active, coded connection type, a payload type, the address without trailing slash."""
    settings = EndpointSettings(id="pacs-1", connection_type=code, address="https://pacs.example.org/dicom-web/")

    assert build_endpoint(settings) == {
        "resourceType": "Endpoint",
        "id": "pacs-1",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": code,
            "display": display,
        },
        "payloadType": [
            {
                "coding": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "113014", "display": "Study"}
                ]
            }
        ],
        "payloadMimeType": [mime_type],
        "address": "https://pacs.example.org/dicom-web",
    }


@pytest.mark.parametrize(
    ("settings", "payload_code"),
    [
        (EndpointSettings(id="pacs", connection_type="dicom-wado-rs", address="https://p"), "113014"),  # study
        (
            EndpointSettings(id="mg", connection_type="dicom-wado-rs", address="https://p", series_modalities=("MG",)),
            "113015",
        ),  # series-level by modality
        (
            EndpointSettings(
                id="cardio", connection_type="dicom-wado-rs", address="https://p", series_calling_aets=("CARDIO",)
            ),
            "113015",
        ),  # series-level by sender
    ],
)
def test_payload_type_says_whether_the_endpoint_serves_the_study_or_a_series(
    settings: EndpointSettings, payload_code: str
) -> None:
    """DICOM 113014 Study for a study endpoint, 113015 Series for a series-level one (as IHE IMR codes it)."""
    (payload_type,) = build_endpoint(settings)["payloadType"]

    assert [coding["code"] for coding in payload_type["coding"]] == [payload_code]


@pytest.mark.parametrize(
    ("code", "claims_the_profile"),
    [("dicom-wado-rs", True), ("ihe-iid", True), ("dicom-wado-uri", False), ("dicom-qido-rs", False)],
)
def test_ihe_imr_endpoints_claim_the_profile_when_their_connection_type_allows(
    code: str, claims_the_profile: bool
) -> None:
    """The IMR Imaging Study Endpoint admits WADO-RS and IID only; other endpoints stay plain, never claim it."""
    resource = build_endpoint(
        EndpointSettings(id="e", connection_type=code, address="https://p", series_modalities=("SR",)),
        profile="ihe-imr",
    )

    assert ("meta" in resource) is claims_the_profile
    if claims_the_profile:
        assert resource["meta"] == {"profile": [IHE_IMR_IMAGING_STUDY_ENDPOINT]}


def test_without_a_profile_an_endpoint_claims_none() -> None:
    resource = build_endpoint(EndpointSettings(id="e", connection_type="dicom-wado-rs", address="https://p"))

    assert "meta" not in resource


def test_series_endpoint_by_calling_ae_serves_only_series_first_sent_by_that_ae() -> None:
    """Rules by modality and by sender combine with OR; a series with no recorded sender matches no AE rule."""
    settings = EndpointSettings(
        id="e",
        connection_type="dicom-wado-rs",
        address="https://p",
        series_modalities=("MG",),
        series_calling_aets=("CARDIO",),
    )

    assert settings.serves_series(modality="XA", sending_ae_title="CARDIO")
    assert settings.serves_series(modality="MG", sending_ae_title="CT_1")
    assert not settings.serves_series(modality="CT", sending_ae_title="CT_1")
    assert not settings.serves_series(modality="CT", sending_ae_title="")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("https://pacs.example.org/dicom-web", "https://pacs.example.org/dicom-web"),  # already clean
        ("https://pacs.example.org/dicom-web/", "https://pacs.example.org/dicom-web"),  # one trailing slash
        ("https://pacs.example.org/dicom-web///", "https://pacs.example.org/dicom-web"),  # several
        ("http://pacs.example.org:8042/", "http://pacs.example.org:8042"),  # bare authority with port
    ],
)
def test_address_loses_every_trailing_slash(address: str, expected: str) -> None:
    """The WADO-RS/URI rules: the service base URL, with no trailing slash, so clients can append paths."""
    settings = EndpointSettings(id="pacs-1", connection_type="dicom-wado-rs", address=address)

    assert build_endpoint(settings)["address"] == expected


def test_name_is_included_only_when_configured() -> None:
    """An empty name is left out rather than sent as an empty string (which FHIR forbids)."""
    unnamed = EndpointSettings(id="pacs-1", connection_type="dicom-wado-rs", address="https://pacs.example.org")
    named = EndpointSettings(
        id="pacs-1", connection_type="dicom-wado-rs", address="https://pacs.example.org", name="Main PACS"
    )

    assert "name" not in build_endpoint(unnamed)
    assert build_endpoint(named)["name"] == "Main PACS"


@pytest.mark.parametrize("code", sorted(CONNECTION_TYPES))
def test_endpoint_is_valid_r4_according_to_fhir_resources(code: str) -> None:
    """The fhir.resources R4B Endpoint model (unchanged from R4) accepts every built Endpoint."""
    pytest.importorskip("fhir.resources")
    from fhir.resources.R4B.endpoint import Endpoint

    resource = build_endpoint(
        EndpointSettings(id="pacs-1", connection_type=code, address="https://pacs.example.org/x/", name="PACS")
    )

    assert Endpoint.model_validate(resource).address == "https://pacs.example.org/x"
