"""Validation before sending: the fhir.resources models plus the checks they miss (required code bindings,
control characters in strings, whitespace in a uri), and the error that keeps an invalid resource unsent."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from pacs_bridge.fhir.endpoint import EndpointSettings, build_endpoint
from pacs_bridge.fhir.validation import InvalidResourceError, resource_problems, validate_resource
from tests.unit.test_mapping_golden import CASES, load


@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize("name", [name for name, _snapshot in CASES])
def test_every_golden_resource_has_no_problem(name: str, version: str) -> None:
    """The reviewed goldens pass the whole validation, not only the models."""
    assert resource_problems(load(name, version), fhir_version=version) == []


@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize("connection_type", ["dicom-wado-rs", "dicom-wado-uri", "ihe-iid"])
def test_every_endpoint_we_build_has_no_problem(connection_type: str, version: str) -> None:
    """Endpoints are validated before their PUT too, and ours pass."""
    settings = EndpointSettings(id="pacs", connection_type=connection_type, address="https://pacs.example.org/x")

    assert resource_problems(build_endpoint(settings, fhir_version=version), fhir_version=version) == []


def broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    resource = copy.deepcopy(load("ct-dose-sr-presentation-state", "R4"))
    change(resource)
    return resource


BROKEN_R4 = [
    # cardinality: subject is 1..1
    pytest.param(broken(lambda r: r.pop("subject")), "subject: Field required", id="missing-subject"),
    # type: series.modality is a Coding, not a string
    pytest.param(broken(lambda r: r["series"][0].update(modality="CT")), "series[0].modality:", id="wrong-type"),
    # structure: no such element in R4
    pytest.param(broken(lambda r: r.update(studyDate="2024")), "studyDate:", id="unknown-element"),
    # required binding: ImagingStudy.status
    pytest.param(broken(lambda r: r.update(status="finished")), "status: 'finished' is not in", id="status-binding"),
    # FHIR strings: no empty string
    pytest.param(broken(lambda r: r.update(description="")), "description:", id="empty-string"),
    # FHIR strings: no control character, even after the first character
    pytest.param(
        broken(lambda r: r.update(description="CT\x1bchest")),
        "description: contains a control character",
        id="control-character",
    ),
    # uri: no whitespace (a misconfigured identifier system)
    pytest.param(
        broken(lambda r: r["subject"]["identifier"].update(system="HOSP A")),
        "subject.identifier.system: a uri may not contain whitespace",
        id="uri-with-space",
    ),
]


@pytest.mark.parametrize(("resource", "fragment"), BROKEN_R4)
def test_each_problem_names_its_element(resource: dict[str, Any], fragment: str) -> None:
    """Structure, cardinality, types, required bindings and primitive rules are each reported at their path."""
    problems = resource_problems(resource, fhir_version="R4")

    assert any(fragment in problem for problem in problems), problems


def test_r4_resource_is_not_valid_r5() -> None:
    """The version matters: an R4-shaped ImagingStudy is refused when R5 is configured."""
    problems = resource_problems(load("ct-dose-sr-presentation-state", "R4"), fhir_version="R5")

    assert any(problem.startswith("modality[0]") for problem in problems)


@pytest.mark.parametrize(
    ("resource", "version", "fragment"),
    [
        ({"resourceType": "Nope"}, "R4", "unknown resource type 'Nope'"),  # not a FHIR resource
        ({"resourceType": "ImagingStudy"}, "R6", "unsupported FHIR version 'R6'"),  # not a release we send
    ],
)
def test_unknown_type_or_version_is_reported(resource: dict[str, Any], version: str, fragment: str) -> None:
    """Nothing unexpected escapes as an exception other than the report."""
    assert any(fragment in problem for problem in resource_problems(resource, fhir_version=version))


def test_validate_resource_raises_a_non_retryable_publish_error_naming_the_resource() -> None:
    """The publisher treats it like a refusal: failed, not retried, with the reason."""
    resource = broken(lambda r: r.update(status="finished"))

    with pytest.raises(InvalidResourceError) as caught:
        validate_resource(resource, fhir_version="R4")

    assert caught.value.retryable is False
    assert caught.value.http_status is None
    assert str(caught.value).startswith(f"ImagingStudy/{resource['id']} is not valid FHIR R4, not sent: status:")


def test_error_lists_five_problems_and_counts_the_rest() -> None:
    """A long list stays readable in last_error and the log."""
    resource = copy.deepcopy(load("ct-dose-sr-presentation-state", "R4"))
    for series in resource["series"]:
        series["modality"] = "CT"  # four wrong types
    resource.update(status="x", foo=1)  # a binding and an unknown element: six problems

    with pytest.raises(InvalidResourceError) as caught:
        validate_resource(resource, fhir_version="R4")

    assert len(caught.value.problems) == 6
    assert str(caught.value).endswith("(and 1 more)")


def test_control_character_problem_does_not_quote_the_value() -> None:
    """Texts may carry patient data: the problem names the element, never its content."""
    resource = broken(lambda r: r.update(description="Secret Name\x01"))

    (problem,) = resource_problems(resource, fhir_version="R4")

    assert "Secret" not in problem
