"""The instance entries an ImagingStudy's validation accepts without the fhir.resources models must be ones the
models accept; whatever it leaves to them is reported exactly as validating the whole resource would."""

from __future__ import annotations

import copy
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pacs_bridge.fhir.imaging_study import build_imaging_study
from pacs_bridge.fhir.validation import (
    _instance_model,
    _model,
    _path,
    _plainly_valid_instance,
    _primitive_problems,
    resource_problems,
)
from tests.unit.test_imaging_study import SETTINGS, fully_described_snapshot

PROPERTY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
VERSIONS = ("R4", "R5")

# Text that is near the edges: spaces, control characters, non-ASCII, quotes, empty.
EDGY_TEXT = st.text(alphabet=st.sampled_from([*string.printable, "\x00", "\x1b", "\x7f", "é", "\u00a0", "\u2028"]))
# JSON values the wrong shape for any of the entry's elements.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.integers(-(2**40), 2**40), EDGY_TEXT, st.just([])
)


@st.composite
def instance_entries(draw: st.DrawFn) -> Any:
    """Mostly entries of the mapping's shape with edge values, sometimes with odd keys or odd values."""
    entry: dict[str, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        entry["uid"] = draw(st.one_of(st.from_regex(r"[0-9.]{1,70}", fullmatch=True), EDGY_TEXT, ODD_VALUES))
    if draw(st.integers(0, 9)):
        sop_class: dict[str, Any] = {}
        for key in draw(st.lists(st.sampled_from(["system", "code", "display", "version", "userSelected"]))):
            sop_class[key] = draw(st.one_of(EDGY_TEXT, st.just("urn:ietf:rfc:3986"), ODD_VALUES))
        entry["sopClass"] = sop_class if draw(st.integers(0, 9)) else draw(ODD_VALUES)
    if draw(st.booleans()):
        entry["number"] = draw(st.one_of(st.integers(-5, 2**31 + 5), ODD_VALUES))
    if draw(st.booleans()):
        entry["title"] = draw(st.one_of(EDGY_TEXT, ODD_VALUES))
    if not draw(st.integers(0, 19)):
        entry[draw(st.sampled_from(["id", "extension", "_title", "series", "frame"]))] = draw(ODD_VALUES)
    return entry


# Values at the edges of the fast path's rules: ids of 64 and 65 characters, texts with spaces, tabs, non-breaking
# or line-separator characters at either end or inside, control characters, the unsignedInt bounds.
EDGE_IDS = st.from_regex(r"[A-Za-z0-9.\-_ ]{0,66}", fullmatch=True)
EDGE_TEXTS = st.builds(
    lambda head, body, tail: head + body + tail,
    st.sampled_from(["", " ", "\t", "\u00a0", "\u2028", "é"]),
    st.text(alphabet=st.sampled_from([*"abcdefgh", " ", "é", "\t", "\n", "\x00", "\x7f", "\u00a0", "\u3000"])),
    st.sampled_from(["", " ", "\n", "\u00a0", "\u3000", "\x1f"]),
)
EDGE_NUMBERS = st.one_of(st.sampled_from([-1, 0, 2**31 - 1, 2**31, True, False, 1.0, "7"]), st.integers())


def mostly(usual: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` four times in five, else ``edge``: an entry then usually has a single value at an edge."""
    return st.integers(0, 4).flatmap(lambda draw: edge if draw == 0 else usual)


PLAIN_TEXTS = st.from_regex(r"[A-Za-z0-9é][A-Za-z0-9é ]{0,20}[A-Za-z0-9é]|[A-Za-z0-9é]", fullmatch=True)


@st.composite
def near_plain_entries(draw: st.DrawFn) -> dict[str, Any]:
    """An entry of the mapping's shape, most values usual ones, one now and then at an edge of the fast path."""
    entry: dict[str, Any] = {
        "uid": draw(mostly(st.from_regex(r"[0-9]{1,10}(\.[0-9]{1,10}){0,5}", fullmatch=True), EDGE_IDS)),
        "sopClass": {
            "system": draw(mostly(st.just("urn:ietf:rfc:3986"), st.sampled_from(["", "urn:ietf rfc", "a\x00b"]))),
            "code": draw(mostly(st.just("urn:oid:1.2.840.10008.5.1.4.1.1.2"), EDGE_TEXTS)),
        },
    }
    if draw(st.booleans()):
        entry["sopClass"]["display"] = draw(mostly(PLAIN_TEXTS, EDGE_TEXTS))
    if draw(st.booleans()):
        entry["number"] = draw(mostly(st.integers(0, 10_000), EDGE_NUMBERS))
    if draw(st.booleans()):
        entry["title"] = draw(mostly(PLAIN_TEXTS, EDGE_TEXTS))
    return entry


def model_accepts(entry: Any, fhir_version: str) -> bool:
    try:
        _instance_model(fhir_version).model_validate(entry)
    except ValidationError:
        return False
    return not _primitive_problems(entry)


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(near_plain_entries(), near_plain_entries(), instance_entries()), st.sampled_from(VERSIONS))
def test_an_entry_accepted_without_the_models_is_one_the_models_accept(entry: Any, fhir_version: str) -> None:
    """Sound, never lenient: the fast check may send a valid entry to the models, never pass an invalid one."""
    if _plainly_valid_instance(entry):
        assert model_accepts(entry, fhir_version), entry


@PROPERTY
@given(st.lists(st.one_of(near_plain_entries(), instance_entries()), max_size=12))
def test_remembering_plain_sop_classes_changes_no_answer(entries: list[Any]) -> None:
    """Within a resource a sopClass found plain is not checked again: every entry still gets the answer it gets
    alone."""
    remembered: list[Any] = []

    assert [_plainly_valid_instance(entry, remembered) for entry in entries] == [
        _plainly_valid_instance(entry) for entry in entries
    ]


@pytest.mark.parametrize("fhir_version", VERSIONS)
def test_the_mapping_s_own_instance_entries_need_no_model(fhir_version: str) -> None:
    """Every entry the mapping builds (number, title, SOP class) takes the fast path: that is its point."""
    resource = build_imaging_study(fully_described_snapshot(), SETTINGS)
    entries = [entry for series in resource["series"] for entry in series.get("instance", [])]

    assert entries and all(_plainly_valid_instance(entry) for entry in entries)


def problems_of_the_whole(resource: dict[str, Any], fhir_version: str) -> list[str]:
    """What validating the whole resource with the models reports (the validation before the fast path)."""
    try:
        _model(fhir_version, "ImagingStudy").model_validate(resource)
        found = []
    except ValidationError as exc:
        found = [f"{_path(tuple(error['loc']))}: {error['msg']}" for error in exc.errors()]
    return found + _primitive_problems(resource)


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 3), st.one_of(near_plain_entries(), instance_entries())), max_size=4))
def test_problems_are_those_of_validating_the_whole_resource(replacements: list[tuple[int, Any]]) -> None:
    """Bad entries placed among good ones are reported at their own paths, with the models' own words."""
    resource = copy.deepcopy(build_imaging_study(fully_described_snapshot(), SETTINGS))
    entries = resource["series"][0]["instance"]
    for position, entry in replacements:
        entries[position % len(entries)] = entry

    ours = [problem for problem in resource_problems(resource, fhir_version="R4")]

    assert sorted(ours) == sorted(problems_of_the_whole(resource, "R4"))
