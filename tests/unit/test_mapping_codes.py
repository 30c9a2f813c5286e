"""Unit tables for the coding pieces of the ImagingStudy mapping: DICOM coding schemes -> FHIR systems,
BodyPartExamined -> SNOMED CT (the Annex L data file), laterality, performer functions and PN rendering."""

from __future__ import annotations

import csv
from importlib import resources
from typing import Any

import pytest
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import codes

from pacs_bridge.fhir.coding import (
    PARTICIPATION_TYPE_SYSTEM,
    SNOMED_CT,
    body_part_table,
    body_site_coding,
    codeable_concept,
    coding_system,
    fhir_coding,
    laterality_coding,
    performer_function,
    series_laterality,
)
from pacs_bridge.fhir.person_name import render_person_name
from pacs_bridge.records import CodedConcept


@pytest.mark.parametrize(
    ("designator", "system"),
    [
        ("SCT", "http://snomed.info/sct"),  # SNOMED CT
        ("LN", "http://loinc.org"),  # LOINC
        ("RADLEX", "http://www.radlex.org"),  # RadLex
        ("DCM", "http://dicom.nema.org/resources/ontology/DCM"),  # DICOM's own codes
        ("UCUM", "http://unitsofmeasure.org"),  # units
        ("I10", "http://hl7.org/fhir/sid/icd-10"),  # ICD-10
        ("C4", "http://www.ama-assn.org/go/cpt"),  # CPT-4
        ("sct", "http://snomed.info/sct"),  # designators are matched case-insensitively
        (" LN ", "http://loinc.org"),  # and without padding
        ("SRT", None),  # SNOMED RT style codes are not SNOMED CT concept ids: kept as text
        ("99LOCAL", None),  # a private (99-prefixed) scheme has no FHIR system
        ("", None),  # no designator at all
    ],
)
def test_coding_system_maps_known_designators_only(designator: str, system: str | None) -> None:
    """Each known CodingSchemeDesignator gives its FHIR URI; anything else gives None."""
    assert coding_system(designator) == system


@pytest.mark.parametrize(
    ("concept", "expected"),
    [
        # a known scheme: system, code and display
        (
            CodedConcept(code="24627-2", scheme="LN", meaning="CT Chest"),
            {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        ),
        # the scheme version becomes Coding.version
        (
            CodedConcept(code="RID10321", scheme="RADLEX", meaning="CT", scheme_version="4.1"),
            {"coding": [{"system": "http://www.radlex.org", "version": "4.1", "code": "RID10321", "display": "CT"}]},
        ),
        # an unknown scheme: the meaning as text, never a code without a system
        (CodedConcept(code="CTTHX", scheme="99ORDERS", meaning="CT thorax"), {"text": "CT thorax"}),
        # an unknown scheme without meaning: scheme and code as text, so nothing is lost
        (CodedConcept(code="CTTHX", scheme="99ORDERS"), {"text": "99ORDERS CTTHX"}),
        # a known scheme but no code (meaning only): text
        (CodedConcept(code="", scheme="SCT", meaning="Cough"), {"text": "Cough"}),
        # a URNCodeValue is its own system
        (
            CodedConcept(code="urn:oid:1.2.3.4", scheme="", meaning="Some concept"),
            {"coding": [{"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.3.4", "display": "Some concept"}]},
        ),
    ],
)
def test_codeable_concept_codes_only_with_a_system(concept: CodedConcept, expected: dict[str, Any]) -> None:
    """A CodeableConcept carries a coding only when the system is known; otherwise text."""
    assert codeable_concept(concept) == expected


def test_fhir_coding_of_an_unknown_scheme_is_none() -> None:
    """No Coding is made up for a scheme without a FHIR system."""
    assert fhir_coding(CodedConcept(code="X", scheme="99X", meaning="x")) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("L", {"system": SNOMED_CT, "code": "7771000", "display": "Left"}),  # left
        ("R", {"system": SNOMED_CT, "code": "24028007", "display": "Right"}),  # right
        ("B", {"system": SNOMED_CT, "code": "51440002", "display": "Right and left"}),  # both (ImageLaterality)
        ("r", {"system": SNOMED_CT, "code": "24028007", "display": "Right"}),  # lower case tolerated
        ("U", None),  # ImageLaterality "unpaired": the body part has no laterality
        ("", None),  # absent
        ("X", None),  # not a DICOM laterality value
    ],
)
def test_laterality_coding_uses_the_cid_244_snomed_codes(value: str, expected: dict[str, str] | None) -> None:
    """R, L and B map to SNOMED CT (CID 244); anything else to no laterality."""
    assert laterality_coding(value) == expected


@pytest.mark.parametrize(
    ("own", "images", "expected"),
    [
        ("R", ["L", "L"], "R"),  # the series' own Laterality wins
        ("", ["L", "L"], "L"),  # all images left: left
        ("", ["L", "R", "L", "R"], "B"),  # a bilateral mammogram series: both
        ("", ["B"], "B"),  # an image of both sides
        ("", ["L", "U"], "L"),  # unpaired images do not count
        ("", ["U", ""], ""),  # nothing lateral
        ("", [], ""),  # no images yet
    ],
)
def test_series_laterality_combines_its_images(own: str, images: list[str], expected: str) -> None:
    """Without series Laterality, the images' ImageLaterality values decide; left and right make both."""
    assert series_laterality(own, images) == expected


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("CHEST", {"system": SNOMED_CT, "code": "816094009", "display": "Chest"}),  # Annex L
        ("CSPINE", {"system": SNOMED_CT, "code": "122494005", "display": "Cervical spine"}),  # abbreviated term
        ("BREAST", {"system": SNOMED_CT, "code": "76752008", "display": "Breast"}),  # mammography
        ("chest ", {"system": SNOMED_CT, "code": "816094009", "display": "Chest"}),  # case and padding ignored
        (
            "CHESTABDPELVIS",
            {"system": SNOMED_CT, "code": "416775004", "display": "Chest, Abdomen and Pelvis"},
        ),  # a display with commas survives the CSV
        ("TORSO", {"display": "TORSO"}),  # not an Annex L term: display only, no code
        ("", None),  # absent: no bodySite
    ],
)
def test_body_site_coding_follows_annex_l_and_keeps_unmapped_terms_as_display(
    term: str, expected: dict[str, str] | None
) -> None:
    """Mapped terms give the SNOMED CT coding; unmapped ones a Coding with display only."""
    assert body_site_coding(term) == expected


def _pydicom_snomed_codes() -> set[str]:
    """Every SNOMED CT code pydicom knows (pydicom.sr, generated by pydicom from DICOM PS3.16)."""
    return {code for entries in concepts["SCT"].values() for code in entries}


# Annex L concepts that no DICOM context group pydicom ships uses, so pydicom does not know them.
NOT_IN_PYDICOM = {"LOWERTRUNK": "63337009", "UPPERTRUNK": "67734004"}


def test_the_table_is_the_whole_of_annex_l() -> None:
    """All 317 rows of PS3.16 Annex L (2026a) that have a defined term, not a hand-picked subset."""
    table = body_part_table()

    assert len(table) == 317
    assert {"ABDOMEN", "BREAST", "CHEST", "HEAD", "KNEE", "WHOLEBODY"} <= set(table)


def test_every_body_part_code_is_a_snomed_concept_known_to_pydicom() -> None:
    """No code in the shipped table is a typo: each is a SNOMED CT concept in pydicom's DICOM tables."""
    known = _pydicom_snomed_codes()

    unknown = {term: site.code for term, site in body_part_table().items() if site.code not in known}

    assert unknown == NOT_IN_PYDICOM


def test_body_part_displays_agree_with_dicom_where_the_concept_is_a_common_anatomic_region() -> None:
    """Where a row's concept is in CID 4030/4031, its display is DICOM's code meaning there, except the
    Endo-* access regions, whose Annex L meaning names the route (Endo-cardiac) rather than the organ."""
    meanings = {}
    for collection in (codes.cid4030, codes.cid4031):
        for keyword in collection.dir():
            code = getattr(collection, keyword)
            meanings[code.value] = code.meaning

    differing = {
        term
        for term, site in body_part_table().items()
        if site.code in meanings and meanings[site.code] != site.display
    }

    assert differing == {"ENDOCARDIAC", "ENDOESOPHAGEAL", "ENDORECTAL", "ENDORENAL", "ENDOURETERIC", "ENDOURETHRAL"}


def test_body_part_terms_are_valid_code_strings() -> None:
    """Terms are what BodyPartExamined can hold: upper-case CS of at most 16 characters, no duplicates."""
    text = resources.files("pacs_bridge.fhir").joinpath("data/body_part_examined.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    terms = [row["term"] for row in rows]

    assert len(terms) == len(set(terms))
    assert all(term == term.upper() and 0 < len(term) <= 16 and " " not in term for term in terms)


def test_body_part_data_file_states_its_provenance() -> None:
    """The shipped table says where it comes from, and carries the licence of the table it reuses."""
    text = resources.files("pacs_bridge.fhir").joinpath("data/body_part_examined.csv").read_text(encoding="utf-8")

    assert "PS3.16 Annex L" in text
    assert "highdicom 0.28.2" in text
    assert "Permission is hereby granted, free of charge" in text


@pytest.mark.parametrize(
    ("role", "code", "display"),
    [
        ("performing_physician", "PRF", "performer"),  # carries out the procedure
        ("operator", "SPRF", "secondary performer"),  # the technologist at the modality
    ],
)
def test_performer_function_codes_come_from_v3_participation_type(role: str, code: str, display: str) -> None:
    """Performer functions are v3-ParticipationType codes with their displays."""
    assert performer_function(role) == {
        "coding": [{"system": PARTICIPATION_TYPE_SYSTEM, "code": code, "display": display}]
    }


@pytest.mark.parametrize(
    ("pn", "display"),
    [
        ("Doe^Jane", "Jane Doe"),  # family^given
        ("Doe^Jane^Q^Dr.^Jr.", "Dr. Jane Q Doe Jr."),  # all five components
        ("House^Gregory^^Dr.", "Dr. Gregory House"),  # empty middle name
        ("Doe", "Doe"),  # family name only
        ("^Jane", "Jane"),  # given name only
        ("Smith  ^  John ", "John Smith"),  # stray spaces
        ("Dr John Smith", "Dr John Smith"),  # free text without components: kept
        (
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "Tarou Yamada (山田 太郎)",
        ),  # both groups; no phonetic
        ("=山田^太郎", "山田 太郎"),  # ideographic only: family name first
        ("==やまだ^たろう", "やまだ たろう"),  # phonetic only, the last resort
        ("Müller^Zoë", "Zoë Müller"),  # Latin-1 letters
        ("", ""),  # empty
        ("^", ""),  # empty components
    ],
)
def test_render_person_name_reads_naturally(pn: str, display: str) -> None:
    """PN values render as display text: given before family, ideographic names family first."""
    assert render_person_name(pn) == display
