"""ServiceRequests on the FHIR test server for the accession.mode tests: seed one as a RIS or an EHR would."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.fhir_server import FhirTestServer

ACCESSION_SYSTEM = "http://hospital.example.org/accession"  # the accession system the order tests configure
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def service_request_resource(
    accession_number: str, *, system: str = ACCESSION_SYSTEM, **elements: Any
) -> dict[str, Any]:
    """An active imaging order whose identifier is the accession number ``system|value``, as a RIS would create it."""
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"display": "the order's patient"},
        "identifier": [{"type": ACSN, "system": system, "value": accession_number}],
        **elements,
    }


def seed_service_request(
    server: FhirTestServer, accession_number: str, *, system: str = ACCESSION_SYSTEM, **elements: Any
) -> str:
    """POST an active imaging order whose identifier is the accession number ``system|value``; returns its id."""
    order = service_request_resource(accession_number, system=system, **elements)
    with httpx.Client(timeout=10, trust_env=False) as http:
        response = http.post(f"{server.base_url}/ServiceRequest", json=order)
    response.raise_for_status()
    order_id: str = response.json()["id"]
    return order_id
