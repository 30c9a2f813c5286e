"""Unit tests for ``pacs_bridge.fhir.client``: how FhirClient.put classifies answers and failures.

httpx.MockTransport stands in for the server: these tests are about classification only (retryable or not,
Retry-After, detail text). Whether publishing works against a real FHIR server is the integration tests' job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.client import FhirClient, PutResult, parse_retry_after

BASE_URL = "https://fhir.example.org/r4"
RESOURCE: dict[str, Any] = {
    "resourceType": "ImagingStudy",
    "id": "1.2.826.0.1.3680043.10.1482.1",
    "status": "available",
    "description": "Thorax Übersicht",
}

Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, base_url: str = BASE_URL) -> FhirClient:
    return FhirClient(httpx.Client(transport=httpx.MockTransport(handler)), base_url=base_url)


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    """A handler that answers every request with ``status`` (and a JSON body when given)."""

    def handle(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handle


def put_failure(handler: Handler) -> PublishError:
    """The PublishError that put raises against ``handler`` (fails the test if it does not raise one)."""
    with pytest.raises(PublishError) as caught:
        client_for(handler).put(RESOURCE)
    return caught.value


@pytest.mark.parametrize(
    ("status", "etag", "expected_version"),
    [
        (200, 'W/"3"', "3"),  # update: weak ETag holds the new versionId
        (201, 'W/"1"', "1"),  # create: first version
        (200, '"7"', "7"),  # a strong ETag from a lenient server
        (200, None, None),  # no ETag at all: the version is unknown, not an error
    ],
)
def test_successful_put_returns_the_status_and_version_from_the_etag(
    status: int, etag: str | None, expected_version: str | None
) -> None:
    """2xx answers are a PutResult; the versionId comes from the ETag."""
    headers = {"ETag": etag} if etag is not None else None

    result = client_for(answer(status, RESOURCE, headers)).put(RESOURCE)

    assert result == PutResult(http_status=status, version_id=expected_version)


def test_put_sends_the_resource_as_fhir_json_to_its_type_and_id() -> None:
    """PUT {base}/ImagingStudy/{id} with Content-Type application/fhir+json and the resource as UTF-8 JSON."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"ETag": 'W/"1"'})

    client_for(handle, base_url=BASE_URL + "/").put(RESOURCE)

    (request,) = seen
    assert request.method == "PUT"
    assert str(request.url) == f"{BASE_URL}/ImagingStudy/1.2.826.0.1.3680043.10.1482.1"
    assert request.headers["Content-Type"] == "application/fhir+json"
    assert request.headers["Accept"] == "application/fhir+json"
    assert json.loads(request.content.decode("utf-8")) == RESOURCE


def test_400_with_operation_outcome_is_not_retryable_and_carries_the_issue_text() -> None:
    """A refusal will not pass by itself; the operator gets the server's own words and where they apply."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "invalid",
                "details": {"text": "Invalid value for started"},
                "expression": ["ImagingStudy.started"],
            },
            {"severity": "error", "code": "required", "diagnostics": "subject is required"},
        ],
    }

    error = put_failure(answer(400, outcome))

    assert (error.retryable, error.http_status) == (False, 400)
    assert error.detail == "Invalid value for started (at ImagingStudy.started); subject is required"
    assert str(error) == f"HTTP 400: {error.detail}"


@pytest.mark.parametrize(
    ("status", "body", "expected_detail"),
    [
        (422, {"resourceType": "OperationOutcome", "issue": [{"code": "processing"}]}, "processing"),  # code only
        (404, "Not here", '"Not here"'),  # not an OperationOutcome: the start of the body
        (409, None, "Conflict"),  # no body at all: the reason phrase
    ],
)
def test_other_4xx_is_not_retryable_and_keeps_what_detail_there_is(
    status: int, body: Any, expected_detail: str
) -> None:
    """Without a full OperationOutcome the detail falls back to the issue code, the body, then the reason."""
    error = put_failure(answer(status, body))

    assert (error.retryable, error.http_status, error.detail) == (False, status, expected_detail)


@pytest.mark.parametrize(
    "status",
    [
        408,  # Request Timeout
        429,  # Too Many Requests
        500,  # Internal Server Error
        502,  # Bad Gateway (a proxy in front of the server)
        503,  # Service Unavailable
        504,  # Gateway Timeout
    ],
)
def test_timeouts_throttling_and_server_errors_are_retryable(status: int) -> None:
    """408, 429 and 5xx may pass by themselves: the study stays pending and is retried."""
    error = put_failure(answer(status))

    assert (error.retryable, error.http_status) == (True, status)


def test_429_with_retry_after_seconds_passes_the_delay_on() -> None:
    """Retry-After: 7 becomes retry_after_seconds 7 for the backoff to honour."""
    error = put_failure(answer(429, headers={"Retry-After": "7"}))

    assert (error.retryable, error.retry_after_seconds) == (True, 7.0)


def test_503_with_an_http_date_retry_after_passes_the_remaining_seconds_on() -> None:
    """An HTTP-date Retry-After becomes the seconds from now until that date."""
    later = datetime.now(UTC) + timedelta(minutes=10)

    error = put_failure(answer(503, headers={"Retry-After": format_datetime(later, usegmt=True)}))

    assert error.retry_after_seconds is not None
    assert 590 <= error.retry_after_seconds <= 600


def test_retryable_status_without_retry_after_has_none() -> None:
    """No header: retry_after_seconds is None and our own backoff decides."""
    assert put_failure(answer(503)).retry_after_seconds is None


def test_503_with_an_undecodable_retry_after_is_still_a_retryable_publish_error() -> None:
    """A garbled Retry-After (here UTF-8 '²') is ignored; put still raises PublishError."""

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers=[(b"Retry-After", "²".encode())])

    error = put_failure(handle)

    assert (error.retryable, error.retry_after_seconds) == (True, None)


@pytest.mark.parametrize(
    "exception",
    [
        httpx.ConnectError("connection refused"),  # server down or wrong port
        httpx.ReadTimeout("no answer"),  # server too slow
        httpx.ConnectTimeout("no SYN-ACK"),  # host unreachable
        httpx.RemoteProtocolError("peer closed connection"),  # connection dropped mid-answer
    ],
)
def test_transport_errors_and_timeouts_are_retryable(exception: httpx.TransportError) -> None:
    """Network failures are retryable, have no HTTP status, and keep the httpx error as the cause."""

    def handle(request: httpx.Request) -> httpx.Response:
        raise exception

    error = put_failure(handle)

    assert (error.retryable, error.http_status) == (True, None)
    assert error.__cause__ is exception
    assert type(exception).__name__ in error.detail


NOW = datetime(2024, 3, 15, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),  # header absent
        ("", None),  # header empty
        ("7", 7.0),  # delta-seconds
        (" 120 ", 120.0),  # surrounding spaces
        ("0", 0.0),  # retry at once
        ("Fri, 15 Mar 2024 10:02:00 GMT", 120.0),  # HTTP-date two minutes ahead
        ("Fri, 15 Mar 2024 09:00:00 GMT", 0.0),  # HTTP-date in the past: no wait, never negative
        ("Fri, 15 Mar 2024 10:02:00", 120.0),  # HTTP-date without zone: read as UTC
        ("7.5", None),  # fractions are not delta-seconds
        ("-3", None),  # negative is not delta-seconds
        ("soon", None),  # neither form
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After as delta-seconds or HTTP-date gives seconds to wait; anything else gives None."""
    assert parse_retry_after(value, now=NOW) == expected
