"""Unit tables for the coding pieces of the ImagingStudy mapping: DICOM coding schemes -> FHIR systems,
BodyPartExamined -> SNOMED CT (the Annex L data file), laterality, performer functions and PN rendering."""

from __future__ import annotations

import csv
import re
from importlib import resources
from typing import Any

import pytest
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import codes

from pacs_bridge.fhir.coding import (
    BODY_PARTS_NOT_MAPPED,
    PARTICIPATION_TYPE_SYSTEM,
    SNOMED_CT,
    body_part_table,
    body_site_coding,
    body_site_text,
    codeable_concept,
    coding_system,
    fhir_coding,
    laterality_coding,
    performer_function,
    reason_concept,
    series_laterality,
)
from pacs_bridge.fhir.person_name import render_person_name
from pacs_bridge.records import CodedConcept, RequestedReason


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
        # a known scheme: system and code; the Code Meaning as text, not as display (the sender's wording, which
        # the bridge cannot check against LOINC or SNOMED CT; issue 20)
        (
            CodedConcept(code="24627-2", scheme="LN", meaning="CT Chest"),
            {"coding": [{"system": "http://loinc.org", "code": "24627-2"}], "text": "CT Chest"},
        ),
        # the scheme version becomes Coding.version
        (
            CodedConcept(code="RID10321", scheme="RADLEX", meaning="CT", scheme_version="4.1"),
            {"coding": [{"system": "http://www.radlex.org", "version": "4.1", "code": "RID10321"}], "text": "CT"},
        ),
        # a known scheme without meaning: the coding alone
        (
            CodedConcept(code="24627-2", scheme="LN"),
            {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
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
            {"coding": [{"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.3.4"}], "text": "Some concept"},
        ),
    ],
)
def test_codeable_concept_codes_only_with_a_system(concept: CodedConcept, expected: dict[str, Any]) -> None:
    """A CodeableConcept carries a coding only when the system is known, never a display it cannot vouch for."""
    assert codeable_concept(concept) == expected


COUGH = CodedConcept(code="49727002", scheme="SCT", meaning="Cough")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        # text and code stated together: one concept (issue 20)
        (
            RequestedReason(text="Persistent cough", codes=(COUGH,)),
            {"coding": [{"system": SNOMED_CT, "code": "49727002"}], "text": "Persistent cough"},
        ),
        # a code alone: its meaning as text
        (RequestedReason(codes=(COUGH,)), {"coding": [{"system": SNOMED_CT, "code": "49727002"}], "text": "Cough"}),
        # a text alone
        (RequestedReason(text="Follow-up"), {"text": "Follow-up"}),
        # a code of an unknown scheme: no coding, the requester's text
        (
            RequestedReason(text="Toux", codes=(CodedConcept(code="T1", scheme="99LOCAL", meaning="Toux"),)),
            {"text": "Toux"},
        ),
    ],
)
def test_a_reason_is_one_concept(reason: RequestedReason, expected: dict[str, Any]) -> None:
    assert reason_concept(reason) == expected


@pytest.mark.parametrize(
    ("concept", "version"),
    [
        # LOINC, RadLex: FHIR writes the version as DICOM does
        (CodedConcept(code="24627-2", scheme="LN", scheme_version="2.74"), "2.74"),
        (CodedConcept(code="RID10321", scheme="RADLEX", scheme_version="4.1"), "4.1"),
        # SNOMED CT: a FHIR version is a URI naming module and date; a DICOM date alone cannot make it (issue 20)
        (CodedConcept(code="49727002", scheme="SCT", scheme_version="20230131"), None),
        # DICOM's own scheme: its CodingSchemeVersion "01" is no edition of the standard
        (CodedConcept(code="113014", scheme="DCM", scheme_version="01"), None),
        # a URN code has no scheme to version
        (CodedConcept(code="urn:oid:1.2.3", scheme="", scheme_version="1"), None),
    ],
)
def test_coding_version_only_where_fhir_can_express_it(concept: CodedConcept, version: str | None) -> None:
    coding = fhir_coding(concept)

    assert coding is not None
    assert coding.get("version") == version


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
    ("term", "coding", "text"),
    [
        ("CHEST", {"system": SNOMED_CT, "code": "816094009"}, "Chest"),  # Annex L
        ("CSPINE", {"system": SNOMED_CT, "code": "122494005"}, "Cervical spine"),  # abbreviated term
        ("BREAST", {"system": SNOMED_CT, "code": "76752008"}, "Breast"),  # mammography
        ("chest ", {"system": SNOMED_CT, "code": "816094009"}, "Chest"),  # case and padding ignored
        ("CHESTABDPELVIS", {"system": SNOMED_CT, "code": "416775004"}, "Chest, Abdomen and Pelvis"),  # comma in CSV
        ("TORSO", None, "TORSO"),  # not an Annex L term: no coding at all, the term as text
        ("ENDORECTAL", None, "ENDORECTAL"),  # Annex L codes it 34402009 Rectum: an approach, not the rectum
        ("ENDOARTERIAL", None, "ENDOARTERIAL"),  # 51114001 Artery
        ("GESTSAC", None, "GESTSAC"),  # 300571009 is a finding, not a body structure
    ],
)
def test_body_site_coding_carries_no_display_and_unmapped_terms_no_coding(
    term: str, coding: dict[str, str] | None, text: str
) -> None:
    """Mapped terms give the SNOMED CT system and code (the Annex L meaning is DICOM's words: text); unmapped ones
    and terms whose code means something else give no Coding (issue 20)."""
    assert (body_site_coding(term), body_site_text(term)) == (coding, text)


def test_an_empty_body_part_gives_nothing() -> None:
    assert body_site_coding("") is None


def _pydicom_snomed_codes() -> set[str]:
    """Every SNOMED CT code pydicom knows (pydicom.sr, generated by pydicom from DICOM PS3.16)."""
    return {code for entries in concepts["SCT"].values() for code in entries}


# Annex L concepts that no DICOM context group pydicom ships uses, so pydicom does not know them.
NOT_IN_PYDICOM = {"LOWERTRUNK": "63337009", "UPPERTRUNK": "67734004"}


def _data_file_rows() -> list[dict[str, str]]:
    text = resources.files("pacs_bridge.fhir").joinpath("data/body_part_examined.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


def test_the_table_is_the_whole_of_annex_l_but_the_terms_not_mapped() -> None:
    """All 317 rows of PS3.16 Annex L (2026a) that have a defined term, not a hand-picked subset; mapped are all
    but the 14 whose code means something else."""
    rows = _data_file_rows()
    table = body_part_table()

    assert len(rows) == 317
    assert set(BODY_PARTS_NOT_MAPPED) <= {row["term"] for row in rows}
    assert set(table) == {row["term"] for row in rows} - set(BODY_PARTS_NOT_MAPPED)
    assert len(table) == 303
    assert {"ABDOMEN", "BREAST", "CHEST", "HEAD", "KNEE", "WHOLEBODY", "ENDOMETRIUM"} <= set(table)


def test_every_body_part_code_is_a_snomed_concept_known_to_pydicom() -> None:
    """No code in the shipped table is a typo: each is a SNOMED CT concept in pydicom's DICOM tables."""
    known = _pydicom_snomed_codes()

    unknown = {term: site.code for term, site in body_part_table().items() if site.code not in known}

    assert unknown == NOT_IN_PYDICOM


def _fully_specified_names() -> dict[str, set[str]]:
    """SNOMED CT fully specified names pydicom's tables carry ("Rectum structure (body structure)"), by code."""
    names: dict[str, set[str]] = {}
    for entries in concepts["SCT"].values():
        for code, (meaning, _cids) in entries.items():
            if re.search(r"\([a-z ]+\)$", meaning):
                names.setdefault(code, set()).add(meaning)
    return names


def test_every_mapped_code_is_a_body_structure_where_snomed_ct_says_what_it_is() -> None:
    """Where pydicom knows the concept's fully specified name, a mapped term's code is a body structure; the one
    exception is amniotic fluid, a substance that is what the term names."""
    names = _fully_specified_names()

    other = {
        term: sorted(names[site.code])
        for term, site in body_part_table().items()
        if site.code in names and not any(name.endswith("(body structure)") for name in names[site.code])
    }

    assert other == {"AMNIOTICFLUID": ["Amniotic fluid (substance)"]}


@pytest.mark.parametrize("term", sorted(term for term in BODY_PARTS_NOT_MAPPED if term.startswith("ENDO")))
def test_an_endo_term_is_not_mapped_because_its_code_is_the_organ_it_passes_through(term: str) -> None:
    """Each Endo-* code is, in SNOMED CT, the structure itself (Rectum structure, Kidney structure ...), never an
    approach: sending it as the body part examined would state something else."""
    code = {row["term"]: row["code"] for row in _data_file_rows()}[term]

    (name,) = _fully_specified_names()[code]

    assert name.endswith("(body structure)")
    assert not name.lower().startswith("endo")


def test_body_part_meanings_agree_with_dicom_where_the_concept_is_a_common_anatomic_region() -> None:
    """Where a mapped row's concept is in CID 4030/4031, its meaning is DICOM's code meaning there (the Endo-*
    rows, whose meaning named the route rather than the organ, are not mapped)."""
    meanings = {}
    for collection in (codes.cid4030, codes.cid4031):
        for keyword in collection.dir():
            code = getattr(collection, keyword)
            meanings[code.value] = code.meaning

    differing = {
        term
        for term, site in body_part_table().items()
        if site.code in meanings and meanings[site.code] != site.meaning
    }

    assert differing == set()


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
