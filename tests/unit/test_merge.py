"""merge_imaging_study: ours replaces what pacs-bridge owns, what others added stays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pacs_bridge.fhir.imaging_study import INTERPRETER_EXTENSION
from pacs_bridge.fhir.merge import OWNED_ELEMENTS, OWNED_EXTENSIONS, merge_imaging_study

GOLDEN = Path(__file__).parent / "golden"
OURS: dict[str, Any] = {
    "resourceType": "ImagingStudy",
    "id": "s1",
    "status": "available",
    "subject": {"identifier": {"value": "PAT-1"}},
    "basedOn": [{"type": "ServiceRequest", "identifier": {"value": "ACC-1"}}],
    "numberOfInstances": 2,
    "series": [{"uid": "1.2", "numberOfInstances": 2}],
}


@pytest.mark.parametrize(
    ("theirs", "expected_extra"),
    [
        # what others add and we do not own is kept
        ({"encounter": {"reference": "Encounter/e1"}}, {"encounter": {"reference": "Encounter/e1"}}),
        ({"note": [{"text": "seen"}]}, {"note": [{"text": "seen"}]}),
        ({"text": {"status": "generated", "div": "<div/>"}}, {"text": {"status": "generated", "div": "<div/>"}}),
        # an owned element we no longer produce is removed; ours replace theirs
        ({"description": "old", "numberOfInstances": 1, "series": []}, {}),
        # the server's version and time go; other meta (tags) stays
        ({"meta": {"versionId": "3", "lastUpdated": "2024-01-01T00:00:00Z"}}, {}),
        ({"meta": {"versionId": "3", "tag": [{"code": "x"}]}}, {"meta": {"tag": [{"code": "x"}]}}),
    ],
)
def test_merge_keeps_what_others_added_and_replaces_what_we_own(theirs: dict[str, Any], expected_extra):
    """The merged resource is ours plus the elements we do not own."""
    assert merge_imaging_study(OURS, {"resourceType": "ImagingStudy", "id": "s1", **theirs}) == {
        **expected_extra,
        **OURS,
    }


def test_merge_takes_our_profile_claim_and_keeps_their_tags():
    """meta is merged key by key: our profile (fhir.profile) replaces theirs, their tag stays, their version goes."""
    ours = {**OURS, "meta": {"profile": ["https://example.org/ours"]}}
    theirs = {"meta": {"versionId": "4", "profile": ["https://example.org/old"], "tag": [{"code": "x"}]}}
    merged = merge_imaging_study(ours, theirs)
    assert merged["meta"] == {"profile": ["https://example.org/ours"], "tag": [{"code": "x"}]}


def test_merge_keeps_literal_based_on_references_after_ours():
    """A literal ServiceRequest reference added by someone else stays; their copy of our identifier is replaced."""
    theirs = {
        "basedOn": [
            {"type": "ServiceRequest", "identifier": {"value": "OLD-ACC"}},
            {"reference": "ServiceRequest/sr-1"},
        ]
    }
    merged = merge_imaging_study(OURS, theirs)
    assert merged["basedOn"] == [OURS["basedOn"][0], {"reference": "ServiceRequest/sr-1"}]


ACSN_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


@pytest.mark.parametrize(
    ("their_based_on", "kept"),
    [
        # their own reference to another order stays
        ([{"reference": "ServiceRequest/sr-2"}], [{"reference": "ServiceRequest/sr-2"}]),
        # their copy of the reference ours carries is not repeated
        ([{"reference": "ServiceRequest/sr-1"}], []),
        # our entry from an earlier write (the accession number corrected since): replaced, not kept as theirs
        (
            [
                {
                    "reference": "ServiceRequest/sr-old",
                    "type": "ServiceRequest",
                    "identifier": {"type": ACSN_TYPE, "system": "urn:oid:1.2.3", "value": "OLD-ACC"},
                }
            ],
            [],
        ),
        # a typed reference of theirs whose identifier is not an accession number stays
        (
            [{"reference": "ServiceRequest/sr-3", "type": "ServiceRequest", "identifier": {"value": "X"}}],
            [{"reference": "ServiceRequest/sr-3", "type": "ServiceRequest", "identifier": {"value": "X"}}],
        ),
    ],
)
def test_merge_keeps_their_order_references_beside_our_linked_order(
    their_based_on: list[dict[str, Any]], kept: list[dict[str, Any]]
) -> None:
    """Ours carries the order's literal reference (accession.mode lookup): theirs are kept after it, except a
    repeat of it and an entry of ours from an earlier write."""
    our_order = {
        "reference": "ServiceRequest/sr-1",
        "type": "ServiceRequest",
        "identifier": {"type": ACSN_TYPE, "system": "urn:oid:1.2.3", "value": "ACC-1"},
    }
    merged = merge_imaging_study({**OURS, "basedOn": [our_order]}, {"basedOn": their_based_on})

    assert merged["basedOn"] == [our_order, *kept]


THEIR_EXTENSION = {"url": "https://example.org/their-extension", "valueString": "kept"}
OUR_READER = {"url": INTERPRETER_EXTENSION, "valueReference": {"type": "Practitioner", "display": "Jane Doe"}}


def test_merge_replaces_our_extensions_and_keeps_theirs():
    """extension is shared by URL: our reading physicians (R5) replace our old ones, their extensions stay."""
    old_reader = {**OUR_READER, "valueReference": {"display": "Old Reader"}}
    merged = merge_imaging_study({**OURS, "extension": [OUR_READER]}, {"extension": [old_reader, THEIR_EXTENSION]})
    assert merged["extension"] == [OUR_READER, THEIR_EXTENSION]


def test_merge_removes_our_extension_once_we_no_longer_write_it():
    """Reading physicians removed from the study: our extension goes, theirs stays (or none is left at all)."""
    assert merge_imaging_study(OURS, {"extension": [OUR_READER, THEIR_EXTENSION]})["extension"] == [THEIR_EXTENSION]
    assert "extension" not in merge_imaging_study(OURS, {"extension": [OUR_READER]})


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.json")), ids=lambda path: path.name)
def test_every_element_the_mapping_writes_is_owned(golden: Path):
    """The goldens' top-level elements (besides resourceType, id and the shared basedOn and extension) are all
    owned, and so is every extension URL they carry."""
    resource = json.loads(golden.read_text(encoding="utf-8"))
    assert set(resource) - {"resourceType", "id", "basedOn", "extension"} <= OWNED_ELEMENTS
    assert {extension["url"] for extension in resource.get("extension", [])} <= OWNED_EXTENSIONS
