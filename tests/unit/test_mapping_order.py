"""accession.mode (issue 15 item 2): basedOn carries the literal reference of the ServiceRequest lookup found,
beside the accession identifier; the configuration key reaches the mapping."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pacs_bridge.config import config_warnings, parse_config
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study
from pacs_bridge.fhir.validation import resource_problems
from pacs_bridge.wiring import mapping_settings
from tests.unit.test_imaging_study import ct_one_series_snapshot
from tests.unit.test_mapping_accession import ACSN, OURS, with_accession

SETTINGS = MappingSettings(accession_identifier_system=OURS, accession_mode="lookup")
MINIMAL = {"fhir": {"base_url": "https://fhir.example.org/r4"}}


@pytest.mark.parametrize("fhir_version", ["R4", "R5"])
def test_the_order_found_is_referenced_beside_the_accession_identifier(fhir_version: Any) -> None:
    """basedOn = [{reference: ServiceRequest/<id>, type, identifier}]: the literal reference first, as in subject."""
    settings = dataclasses.replace(SETTINGS, fhir_version=fhir_version)

    resource = build_imaging_study(with_accession(), settings, order_reference="ServiceRequest/sr-7")

    assert resource["basedOn"] == [
        {
            "reference": "ServiceRequest/sr-7",
            "type": "ServiceRequest",
            "identifier": {"type": ACSN, "system": OURS, "value": "ACC-0001"},
        }
    ]
    assert resource_problems(resource, fhir_version=fhir_version) == []


def test_without_an_order_found_based_on_stays_a_reference_by_identifier() -> None:
    resource = build_imaging_study(with_accession(), SETTINGS, order_reference=None)

    assert resource["basedOn"] == [
        {"type": "ServiceRequest", "identifier": {"type": ACSN, "system": OURS, "value": "ACC-0001"}}
    ]


def test_the_reference_changes_the_content_hash_so_a_found_order_is_published() -> None:
    """The only difference between the two resources is the reference: the publisher sends the linked one."""
    without = build_imaging_study(ct_one_series_snapshot(), SETTINGS)
    linked = build_imaging_study(ct_one_series_snapshot(), SETTINGS, order_reference="ServiceRequest/sr-7")

    assert {key: value for key, value in linked.items() if key != "basedOn"} == {
        key: value for key, value in without.items() if key != "basedOn"
    }
    assert linked["basedOn"] != without["basedOn"]


@pytest.mark.parametrize(
    ("accession", "expected"),
    [
        ({}, "identifier"),  # the default: no request about the order
        ({"mode": "identifier"}, "identifier"),
        ({"mode": "lookup", "identifier_system": OURS}, "lookup"),
    ],
)
def test_accession_mode_reaches_the_mapping(accession: dict[str, Any], expected: str) -> None:
    config = parse_config({**MINIMAL, "accession": accession}, path="bridge.yaml")

    assert mapping_settings(config).accession_mode == expected


def test_an_unknown_accession_mode_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({**MINIMAL, "accession": {"mode": "create"}}, path="bridge.yaml")

    assert list(refused.value.problems) == [
        "at 'accession.mode': Input should be 'identifier' or 'lookup', got 'create'"
    ]


def test_lookup_without_any_accession_system_is_valid_but_warned_about() -> None:
    """No system for any accession number: nothing would ever be searched; check-config says so, naming the keys."""
    config = parse_config({**MINIMAL, "accession": {"mode": "lookup"}}, path="bridge.yaml")

    (warning,) = config_warnings(config)
    assert warning.startswith("at 'accession.mode': lookup searches the FHIR server's ServiceRequests")
    assert "accession.identifier_system" in warning
    for configured in ({"identifier_system": OURS}, {"issuers": {"RIS-B": OURS}}):
        with_system = parse_config({**MINIMAL, "accession": {"mode": "lookup", **configured}}, path="bridge.yaml")
        assert config_warnings(with_system) == []
