"""The subject's identifier system from IssuerOfPatientID (patient.issuers), never a wrong system."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

from pacs_bridge.config import parse_config
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study
from pacs_bridge.wiring import mapping_settings
from tests.unit.test_imaging_study import ct_one_series_snapshot

DEFAULT = "urn:oid:1.2.250.1.71.4.2.1"
ISSUERS = {"HOSP-A": "urn:oid:1.2.3.4", "HOSP-B": "http://hospital-b.example.org/mrn"}


def subject(issuer: str, *, issuers: dict[str, str], default: str = DEFAULT) -> dict[str, Any]:
    snapshot = ct_one_series_snapshot()
    snapshot = dataclasses.replace(
        snapshot, attributes=dataclasses.replace(snapshot.attributes, issuer_of_patient_id=issuer)
    )
    settings = MappingSettings(patient_identifier_system=default, patient_issuer_systems=issuers)
    result: dict[str, Any] = build_imaging_study(snapshot, settings)["subject"]
    return result


@pytest.mark.parametrize(
    ("issuer", "issuers", "default", "identifier"),
    [
        # no table, an issuer named: no system (DEFAULT names another namespace than HOSP-A's: issue 20), the
        # issuer named as assigner
        ("HOSP-A", {}, DEFAULT, {"value": "PAT-0001", "assigner": {"display": "HOSP-A"}}),
        # no table, no issuer named: identifier_system
        ("", {}, DEFAULT, {"system": DEFAULT, "value": "PAT-0001"}),
        # an issuer named the same as in a one-entry table: the table's system (how a site names its own issuer)
        ("HOSP-A", {"HOSP-A": DEFAULT}, DEFAULT, {"system": DEFAULT, "value": "PAT-0001"}),
        # a listed issuer: its system
        ("HOSP-A", ISSUERS, DEFAULT, {"system": "urn:oid:1.2.3.4", "value": "PAT-0001"}),
        ("HOSP-B", ISSUERS, DEFAULT, {"system": "http://hospital-b.example.org/mrn", "value": "PAT-0001"}),
        # an unlisted issuer: no system rather than a wrong one, and the issuer named
        ("HOSP-C", ISSUERS, DEFAULT, {"value": "PAT-0001", "assigner": {"display": "HOSP-C"}}),
        # no issuer stated: identifier_system
        ("", ISSUERS, DEFAULT, {"system": DEFAULT, "value": "PAT-0001"}),
        # no issuer and no identifier_system: the value alone
        ("", ISSUERS, "", {"value": "PAT-0001"}),
    ],
)
def test_subject_identifier_system_follows_the_issuer(
    issuer: str, issuers: dict[str, str], default: str, identifier: dict[str, Any]
) -> None:
    """The issuer table picks the system; an unknown issuer never gets another issuer's system."""
    assert subject(issuer, issuers=issuers, default=default) == {"type": "Patient", "identifier": identifier}


def test_unlisted_issuer_resource_is_valid_r4() -> None:
    """Identifier.assigner with a display only is valid R4."""
    snapshot = ct_one_series_snapshot()
    snapshot = dataclasses.replace(
        snapshot, attributes=dataclasses.replace(snapshot.attributes, issuer_of_patient_id="HOSP-C")
    )

    ImagingStudyR4.model_validate(build_imaging_study(snapshot, MappingSettings(patient_issuer_systems=ISSUERS)))


def test_config_issuers_reach_the_mapping() -> None:
    """patient.issuers becomes MappingSettings.patient_issuer_systems."""
    config = parse_config(
        {"fhir": {"base_url": "http://fhir.example.org"}, "patient": {"issuers": {"HOSP-A": "urn:oid:1.2.3.4"}}},
        path="test.yaml",
    )

    assert dict(mapping_settings(config).patient_issuer_systems) == {"HOSP-A": "urn:oid:1.2.3.4"}


def test_config_refuses_an_issuer_system_with_spaces() -> None:
    """A system is a URI: the problem names the key path and the issuer."""
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"fhir": {"base_url": "http://fhir.example.org"}, "patient": {"issuers": {"HOSP-A": "urn oid 1.2"}}},
            path="test.yaml",
        )

    assert "at 'patient.issuers'" in str(caught.value)
    assert "HOSP-A" in str(caught.value)
