"""The R4 golden ImagingStudy resources are accepted by the real test FHIR server (Medplum engine with R4
validation), and read back as sent."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest

from pacs_bridge.fhir.imaging_study import IHE_IMR_IMAGING_STUDY, build_imaging_study
from tests.support.fhir_server import FhirTestServer
from tests.unit.test_mapping_golden import (
    CASES,
    R4_SETTINGS,
    ct_with_dose_sr_and_presentation_state,
    load,
    snapshot_of,
)

pytestmark = pytest.mark.fhir_server


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in resource.items() if key != "meta"}


@pytest.mark.parametrize("name", [name for name, _snapshot in CASES])
def test_r4_golden_resource_is_accepted_by_the_fhir_server(fresh_fhir_server: FhirTestServer, name: str) -> None:
    """PUT answers 201 (no OperationOutcome error) and the stored resource equals the golden one."""
    resource = load(name, "R4")

    with httpx.Client(base_url=fresh_fhir_server.base_url, timeout=30.0, trust_env=False) as client:
        response = client.put(f"/ImagingStudy/{resource['id']}", json=resource)

    assert response.status_code == 201, response.text
    assert without_meta(fresh_fhir_server.read("ImagingStudy", resource["id"]) or {}) == resource


def test_ihe_imr_study_is_accepted_with_its_profile_claim(fresh_fhir_server: FhirTestServer) -> None:
    """With fhir.profile ihe-imr the resource claims the IMR profile; the server accepts and keeps the claim."""
    resource = build_imaging_study(
        snapshot_of(ct_with_dose_sr_and_presentation_state()), dataclasses.replace(R4_SETTINGS, profile="ihe-imr")
    )

    with httpx.Client(base_url=fresh_fhir_server.base_url, timeout=30.0, trust_env=False) as client:
        response = client.put(f"/ImagingStudy/{resource['id']}", json=resource)

    assert response.status_code == 201, response.text
    stored = fresh_fhir_server.read("ImagingStudy", resource["id"]) or {}
    assert stored["meta"]["profile"] == [IHE_IMR_IMAGING_STUDY]
