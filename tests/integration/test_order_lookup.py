"""accession.mode lookup against the real FHIR test server: OrderResolver, then the publisher (index on SQLite and
PostgreSQL)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.orders import OrderResolver
from pacs_bridge.publish.publisher import PublishOutcome
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from tests.conftest import QUIET, FakeClock
from tests.integration.test_publish_outage import publisher as outage_publisher
from tests.integration.test_publish_outage import study_row
from tests.integration.test_publisher import WADO, make_publisher
from tests.support.fault_proxy import HttpFaultProxy, Pass, Respond
from tests.support.fhir_server import FhirTestServer
from tests.support.orders import ACCESSION_SYSTEM, ACSN, seed_service_request
from tests.support.studies import uid

pytestmark = pytest.mark.fhir_server

LOOKUP = MappingSettings(endpoints=(WADO,), accession_identifier_system=ACCESSION_SYSTEM, accession_mode="lookup")
ORDERED = StudyAttributes(study_uid=uid("1"), patient_id="PAT-0001", accession_number="ACC-0001")


@pytest.fixture
def sent() -> Iterator[tuple[httpx.Client, list[str]]]:
    """An HTTP client that notes "METHOD path" of every request it sends."""
    requests: list[str] = []

    def note(request: httpx.Request) -> None:
        requests.append(f"{request.method} {request.url.path}")

    with httpx.Client(timeout=10, trust_env=False, event_hooks={"request": [note]}) as client:
        yield client, requests


def resolver(http: httpx.Client, server: FhirTestServer, **settings: Any) -> OrderResolver:
    mapping = dataclasses.replace(LOOKUP, **settings)
    return OrderResolver(FhirClient(http, base_url=server.base_url), mapping)


def fallbacks(logs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {key: value for key, value in entry.items() if key != "log_level"}
        for entry in logs
        if entry["event"] == "order_lookup_fallback"
    ]


def test_lookup_references_the_one_order_with_the_accession_identifier(
    http: httpx.Client, fresh_fhir_server: FhirTestServer
) -> None:
    """One ServiceRequest with system|value: its literal reference; another issuer's same number is no match."""
    order_id = seed_service_request(fresh_fhir_server, "ACC-0001")
    seed_service_request(fresh_fhir_server, "ACC-0001", system="urn:oid:9.9.9")  # same number, other RIS
    seed_service_request(fresh_fhir_server, "ACC-0002")

    with capture_logs() as logs:
        reference = resolver(http, fresh_fhir_server).reference(ORDERED)

    assert reference == f"ServiceRequest/{order_id}"
    assert fallbacks(logs) == []
    assert fresh_fhir_server.request_counts() == {"POST ServiceRequest": 3}, "only the seeding: lookup writes nothing"


@pytest.mark.parametrize(("seeded", "reason"), [(0, "no_match"), (2, "several_matches")])
def test_without_exactly_one_order_based_on_stays_by_identifier_and_the_log_says_which(
    http: httpx.Client, fresh_fhir_server: FhirTestServer, seeded: int, reason: str
) -> None:
    """0 or 2 matches: no reference, one warning with the study UID, the reason and the count."""
    for _ in range(seeded):
        seed_service_request(fresh_fhir_server, "ACC-0001")

    with capture_logs() as logs:
        reference = resolver(http, fresh_fhir_server).reference(ORDERED)

    assert reference is None
    assert fallbacks(logs) == [
        {"event": "order_lookup_fallback", "study_uid": uid("1"), "reason": reason, "matches": seeded}
    ]


@pytest.mark.parametrize(
    ("settings", "attributes", "logged"),
    [
        # the study names an issuer accession.issuers does not map: no system, never searched
        (
            {"accession_issuer_systems": {"RIS-A": ACCESSION_SYSTEM}},
            {"accession_issuer_local_id": "RIS-C"},
            {"reason": "issuer_not_mapped", "issuer": "RIS-C"},
        ),
        # no system configured at all: a bare value is never searched
        ({"accession_identifier_system": ""}, {}, {"reason": "no_identifier_system"}),
        # identifier mode: nothing asked, nothing logged
        ({"accession_mode": "identifier"}, {}, None),
        # no accession number: no basedOn, nothing to link, nothing logged
        ({}, {"accession_number": ""}, None),
    ],
)
def test_an_accession_number_without_system_is_never_searched(
    sent: tuple[httpx.Client, list[str]],
    fresh_fhir_server: FhirTestServer,
    settings: dict[str, Any],
    attributes: dict[str, str],
    logged: dict[str, str] | None,
) -> None:
    """Even with an order carrying that bare value on the server, no request is sent and no reference made."""
    seed_service_request(fresh_fhir_server, "ACC-0001")
    http, requests = sent
    study = dataclasses.replace(ORDERED, **attributes)

    with capture_logs() as logs:
        reference = resolver(http, fresh_fhir_server, **settings).reference(study)

    assert reference is None
    assert requests == []
    expected = [] if logged is None else [{"event": "order_lookup_fallback", "study_uid": uid("1"), **logged}]
    assert fallbacks(logs) == expected


def test_the_accession_number_stays_out_of_the_url(
    sent: tuple[httpx.Client, list[str]], fresh_fhir_server: FhirTestServer
) -> None:
    """The search goes as POST ServiceRequest/_search with the token in the body, like the patient's."""
    http, requests = sent

    resolver(http, fresh_fhir_server).look_up(ORDERED)

    assert requests == ["POST /fhir/ServiceRequest/_search"]


# ---- through the publisher -------------------------------------------------------------------------------------


def record() -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(
            study_uid=uid("1"), patient_id="PAT-0001", accession_number="ACC-0001", study_date="20240315"
        ),
        series=SeriesAttributes(series_uid=uid("1.1"), modality="CT", series_number=1),
        sop_instance_uid=uid("1.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
    )


def test_the_published_study_is_found_by_basedon_with_the_order_reference(
    index: Index, http: httpx.Client, clock: FakeClock, fresh_fhir_server: FhirTestServer
) -> None:
    """The server accepts basedOn with reference, type and identifier, and basedon=ServiceRequest/<id> finds it."""
    order_id = seed_service_request(fresh_fhir_server, "ACC-0001")
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)

    outcome = make_publisher(index, http, fresh_fhir_server.base_url, clock, mapping=LOOKUP).run_once()

    assert outcome == {uid("1"): PublishOutcome.PUBLISHED}
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None
    assert study["basedOn"] == [
        {
            "reference": f"ServiceRequest/{order_id}",
            "type": "ServiceRequest",
            "identifier": {"type": ACSN, "system": ACCESSION_SYSTEM, "value": "ACC-0001"},
        }
    ]
    found = fresh_fhir_server.search("ImagingStudy", basedon=f"ServiceRequest/{order_id}")
    assert [resource["id"] for resource in found] == [uid("1")]


def test_a_failed_order_search_is_retried_like_any_publish_failure(
    index: Index,
    engine: Engine,
    http: httpx.Client,
    proxy: HttpFaultProxy,
    clock: FakeClock,
    fresh_fhir_server: FhirTestServer,
) -> None:
    """503 on the ServiceRequest search: pending with backoff and nothing written; the next attempt links."""
    order_id = seed_service_request(fresh_fhir_server, "ACC-0001")
    proxy.program(Respond(503, body="busy"), Pass())
    publish = outage_publisher(index, http, proxy, clock, mapping=LOOKUP)
    index.record_instance(record(), received_at=clock())
    clock.advance(QUIET)

    assert publish.run_once() == {uid("1"): PublishOutcome.RETRY_SCHEDULED}
    row = study_row(engine)
    assert (row.publish_state, row.attempts, row.last_error) == ("pending", 1, "HTTP 503: busy")
    assert fresh_fhir_server.read("ImagingStudy", uid("1")) is None

    clock.advance(QUIET * 20)
    assert publish.run_once() == {uid("1"): PublishOutcome.PUBLISHED}
    study = fresh_fhir_server.read("ImagingStudy", uid("1"))
    assert study is not None and study["basedOn"][0]["reference"] == f"ServiceRequest/{order_id}"
