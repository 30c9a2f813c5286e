"""Pins the behaviours of the test FHIR server (tests/fhir_server) that the project's tests rely on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.fhir_server import FhirTestServer

pytestmark = pytest.mark.fhir_server

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
STUDY_ID = "study-1"


def imaging_study(description: str = "CT chest", study_id: str = STUDY_ID) -> dict[str, Any]:
    """A small valid R4 ImagingStudy, shaped like the ones the bridge publishes."""
    return {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "description": description,
        "endpoint": [{"reference": "Endpoint/pacs-1"}],
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [
            {
                "uid": f"{STUDY_UID}.1",
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
                "instance": [{"uid": f"{STUDY_UID}.1.1", "sopClass": {"code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}}],
            }
        ],
    }


ENDPOINT = {
    "resourceType": "Endpoint",
    "id": "pacs-1",
    "status": "active",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    },
    "payloadType": [{"text": "DICOM"}],
    "address": "https://pacs.example.org/dicom-web",
}


@pytest.fixture(scope="module")
def server() -> Iterator[FhirTestServer]:
    with FhirTestServer() as fhir:
        yield fhir


@pytest.fixture()
def fhir(server: FhirTestServer) -> FhirTestServer:
    """The module's server, emptied: each test starts from no resources and no counted requests."""
    server.reset()
    return server


@pytest.fixture()
def client(fhir: FhirTestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fhir.base_url, timeout=30.0, trust_env=False) as http:
        yield http


def put(client: httpx.Client, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource, headers=headers)


def test_metadata_answers_with_an_r4_capability_statement(client: httpx.Client) -> None:
    """GET /fhir/metadata answers 200 with an R4 CapabilityStatement."""
    response = client.get("/metadata")
    assert response.status_code == 200
    assert response.json()["resourceType"] == "CapabilityStatement"
    assert response.json()["fhirVersion"] == "4.0.1"


@pytest.mark.parametrize(
    ("change", "element"),
    [
        ({"status": "finished"}, "ImagingStudy.status"),  # not in the required ValueSet
        ({"subject": None}, "ImagingStudy.subject"),  # required element missing
        ({"modality": "CT"}, "ImagingStudy.modality"),  # wrong type: a Coding array
        ({"studyDate": "2024-01-01"}, "ImagingStudy.studyDate"),  # no such element in R4
        ({"description": ""}, "ImagingStudy.description"),  # empty strings are not allowed in FHIR JSON
    ],
)
def test_invalid_imaging_study_gets_400_with_an_operation_outcome_naming_the_element(
    fhir: FhirTestServer, client: httpx.Client, change: dict[str, Any], element: str
) -> None:
    """An invalid ImagingStudy gets 400 with an OperationOutcome naming the element, is not stored, is counted."""
    study = {key: value for key, value in {**imaging_study(), **change}.items() if value is not None}
    response = put(client, study)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(element in issue.get("expression", []) for issue in outcome["issue"]), outcome
    assert fhir.read("ImagingStudy", STUDY_ID) is None
    assert fhir.request_counts() == {"PUT ImagingStudy": 1}


def test_put_creates_with_201_and_version_1(fhir: FhirTestServer, client: httpx.Client) -> None:
    """A PUT to a new id creates the resource: 201, ETag W/"1", meta.versionId "1", Location of version 1."""
    response = put(client, imaging_study())
    assert response.status_code == 201
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"] == f"{fhir.base_url}/ImagingStudy/{STUDY_ID}/_history/1"
    assert response.json()["meta"]["versionId"] == "1"
    assert fhir.versions("ImagingStudy", STUDY_ID) == 1


def test_identical_put_keeps_the_version_but_is_counted(fhir: FhirTestServer, client: httpx.Client) -> None:
    """An identical PUT answers 200 and keeps version 1 (as HAPI), yet the request count goes to 2."""
    assert put(client, imaging_study()).status_code == 201
    response = put(client, imaging_study())
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"1"'
    assert fhir.versions("ImagingStudy", STUDY_ID) == 1
    assert fhir.request_counts() == {"PUT ImagingStudy": 2}


def test_changed_puts_make_versions_2_and_3_listed_in_history(fhir: FhirTestServer, client: httpx.Client) -> None:
    """Each changed PUT answers 200 with the next version; _history lists them all, newest first."""
    put(client, imaging_study("v1"))
    for version in (2, 3):
        response = put(client, imaging_study(f"v{version}"))
        assert response.status_code == 200
        assert response.headers["etag"] == f'W/"{version}"'
        assert response.json()["meta"]["versionId"] == str(version)
    history = client.get(f"/ImagingStudy/{STUDY_ID}/_history").json()
    assert history["type"] == "history"
    assert [entry["resource"]["description"] for entry in history["entry"]] == ["v3", "v2", "v1"]
    assert fhir.versions("ImagingStudy", STUDY_ID) == 3
    assert fhir.read("ImagingStudy", STUDY_ID) == history["entry"][0]["resource"]


def test_stale_if_match_gets_412_and_current_if_match_updates(fhir: FhirTestServer, client: httpx.Client) -> None:
    """A PUT with If-Match naming a stale version gets 412 and changes nothing; the current version passes."""
    put(client, imaging_study("v1"))
    put(client, imaging_study("v2"))
    stale = put(client, imaging_study("v3"), **{"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert fhir.versions("ImagingStudy", STUDY_ID) == 2
    current = put(client, imaging_study("v3"), **{"If-Match": 'W/"2"'})
    assert current.status_code == 200
    assert current.headers["etag"] == 'W/"3"'


def test_search_by_identifier_finds_the_study(fhir: FhirTestServer, client: httpx.Client) -> None:
    """GET /fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid> finds exactly that study."""
    put(client, imaging_study())
    other = imaging_study(study_id="study-2")
    other["identifier"] = [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}]
    put(client, other)
    found = fhir.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{STUDY_UID}")
    assert [study["id"] for study in found] == [STUDY_ID]
    assert fhir.search("ImagingStudy", identifier="urn:dicom:uid|urn:oid:9.9.9") == []


def test_endpoint_put_creates_then_updates(fhir: FhirTestServer, client: httpx.Client) -> None:
    """PUT /fhir/Endpoint/{id} creates (201, version 1), then a change updates (200, version 2)."""
    assert put(client, ENDPOINT).status_code == 201
    response = put(client, {**ENDPOINT, "name": "Main PACS"})
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"'
    assert fhir.request_counts() == {"PUT Endpoint": 2}


def test_delete_removes_the_resource(fhir: FhirTestServer, client: httpx.Client) -> None:
    """DELETE answers 200; the resource then reads as 410 Gone and no longer matches searches."""
    put(client, imaging_study())
    assert client.delete(f"/ImagingStudy/{STUDY_ID}").status_code == 200
    assert client.get(f"/ImagingStudy/{STUDY_ID}").status_code == 410
    assert fhir.read("ImagingStudy", STUDY_ID) is None
    assert fhir.search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{STUDY_UID}") == []
    assert fhir.request_counts() == {"PUT ImagingStudy": 1, "DELETE ImagingStudy": 1}


def test_reset_clears_the_store_and_the_counts(fhir: FhirTestServer, client: httpx.Client) -> None:
    """POST /__test__/reset empties the store, the version numbers and the request counts."""
    put(client, imaging_study("v1"))
    put(client, imaging_study("v2"))
    put(client, ENDPOINT)
    assert fhir.request_counts() == {"PUT ImagingStudy": 2, "PUT Endpoint": 1}
    fhir.reset()
    assert fhir.request_counts() == {}
    assert fhir.read("ImagingStudy", STUDY_ID) is None
    assert fhir.versions("ImagingStudy", STUDY_ID) == 0
    assert fhir.search("ImagingStudy") == []
    assert put(client, imaging_study()).headers["etag"] == 'W/"1"'  # numbering starts again


def test_referential_integrity_rejects_dangling_references_when_enabled() -> None:
    """With referential_integrity=True a reference to a missing resource gets 400 naming the reference."""
    with (
        FhirTestServer(referential_integrity=True) as fhir,
        httpx.Client(base_url=fhir.base_url, trust_env=False) as client,
    ):
        response = put(client, imaging_study())
        assert response.status_code == 400
        expressions = [path for issue in response.json()["issue"] for path in issue["expression"]]
        assert "ImagingStudy.subject.reference" in expressions
        assert "ImagingStudy.endpoint[0].reference" in expressions
        assert put(client, ENDPOINT).status_code == 201
        patient = {"resourceType": "Patient", "id": "p1"}
        assert client.put("/Patient/p1", json=patient).status_code == 201
        assert put(client, imaging_study()).status_code == 201
