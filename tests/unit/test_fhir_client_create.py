"""Unit tests for ``FhirClient.create`` (POST, conditional with If-None-Exist) and ``search(in_body=True)``.

httpx.MockTransport stands in for servers that answer in ways the test server does not (an OperationOutcome
body, Content-Location only, nothing at all): how the created id is read from each answer, and how failures
are classified. That creating and finding Patients works is tests/integration/test_patient_modes.py's job.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.client import CreateResult
from tests.unit.test_fhir_client import BASE_URL, answer, client_for

PATIENT: dict[str, Any] = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "P1"}]}
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational"}]}


@pytest.mark.parametrize(
    ("status", "body", "headers", "resource_id"),
    [
        # the created (201) or existing (200) resource in the body
        (201, {**PATIENT, "id": "p-1"}, {}, "p-1"),
        (200, {**PATIENT, "id": "p-1"}, {}, "p-1"),
        # no body (Prefer: return=minimal): Location, with or without _history, absolute or relative
        (201, None, {"Location": f"{BASE_URL}/Patient/p-2/_history/1"}, "p-2"),
        (201, None, {"Location": "Patient/p-2"}, "p-2"),
        # an OperationOutcome body (HAPI on a conditional create match) and Content-Location
        (200, OUTCOME, {"Content-Location": f"{BASE_URL}/Patient/p-3/_history/4"}, "p-3"),
        # a Location that is not a Patient's: not taken for one
        (201, None, {"Location": f"{BASE_URL}/Observation/o-1"}, None),
        # nothing says which resource: the caller has to find it
        (200, None, {}, None),
        (200, OUTCOME, {}, None),
    ],
)
def test_create_reads_the_id_from_the_body_else_from_location(
    status: int, body: Any, headers: dict[str, str], resource_id: str | None
) -> None:
    """200 and 201, with or without a body: the id comes from where the server put it, else None."""
    result = client_for(answer(status, body, headers)).create(PATIENT, if_none_exist="identifier=urn:oid:1.2.3|P1")

    assert result == CreateResult(http_status=status, resource_id=resource_id)


def test_create_posts_fhir_json_to_the_type_with_if_none_exist() -> None:
    """POST {base}/Patient, no id in the URL, the If-None-Exist header as given."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={**PATIENT, "id": "p-1"})

    client_for(handle).create(PATIENT, if_none_exist="identifier=urn:oid:1.2.3|P1")

    (request,) = seen
    assert (request.method, str(request.url)) == ("POST", f"{BASE_URL}/Patient")
    assert request.headers["Content-Type"] == "application/fhir+json"
    assert request.headers["If-None-Exist"] == "identifier=urn:oid:1.2.3|P1"
    assert json.loads(request.content) == PATIENT


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),  # the server refuses the Patient: the study is marked failed
        (422, False),
        (412, False),  # several matches: the caller decides (it falls back to the identifier)
        (429, True),
        (503, True),
    ],
)
def test_create_failures_are_classified_like_puts(status: int, retryable: bool) -> None:
    """4xx (but 408/429) is a refusal; 5xx and 429 may pass and are retried."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": "no"}],
    }

    with pytest.raises(PublishError) as caught:
        client_for(answer(status, outcome)).create(PATIENT, if_none_exist="identifier=a|b")

    assert (caught.value.http_status, caught.value.retryable) == (status, retryable)


def test_search_in_body_posts_a_form_to_search_and_follows_next_links() -> None:
    """POST {type}/_search with the parameters as a form (none in the URL), then GET the next pages."""
    seen: list[httpx.Request] = []
    page_2 = f"{BASE_URL}/Patient?page=2"

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            entry = [{"resource": {**PATIENT, "id": "p-1"}}]
            return httpx.Response(
                200, json={"resourceType": "Bundle", "entry": entry, "link": [{"relation": "next", "url": page_2}]}
            )
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": [{"resource": {**PATIENT, "id": "p-2"}}]})

    found = client_for(handle).search("Patient", {"identifier": "urn:oid:1.2.3|P1"}, in_body=True)

    assert [patient["id"] for patient in found] == ["p-1", "p-2"]
    first, second = seen
    assert (first.method, str(first.url)) == ("POST", f"{BASE_URL}/Patient/_search")
    assert first.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert first.content == b"_count=100&identifier=urn%3Aoid%3A1.2.3%7CP1"
    assert (second.method, str(second.url)) == ("GET", page_2)
