"""Patients on the FHIR test server for the patient.mode tests: seed one as another system would, list them."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.fhir_server import FhirTestServer

SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"  # the identifier system the e2e bridge configuration uses


def patient_resource(value: str, *, system: str = SYSTEM, **elements: Any) -> dict[str, Any]:
    """A Patient with identifier ``system|value`` (and ``elements``), as an EHR would create it."""
    return {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], **elements}


def seed_patient(server: FhirTestServer, value: str, *, system: str = SYSTEM, **elements: Any) -> str:
    """POST a Patient with identifier ``system|value`` (and ``elements``) as an EHR would; returns its id."""
    patient = patient_resource(value, system=system, **elements)
    with httpx.Client(timeout=10, trust_env=False) as http:
        response = http.post(f"{server.base_url}/Patient", json=patient)
    response.raise_for_status()
    patient_id: str = response.json()["id"]
    return patient_id


def patients_with(server: FhirTestServer, value: str, *, system: str = SYSTEM) -> list[dict[str, Any]]:
    """Every Patient the server holds with identifier ``system|value``."""
    return server.search("Patient", identifier=f"{system}|{value}")
