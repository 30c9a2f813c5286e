"""Pure coding tables for the ImagingStudy mapping: DICOM coding schemes -> FHIR systems, laterality, performer
functions and BodyPartExamined -> SNOMED CT (PS3.16 Annex L, from the data file shipped in the package).

The rules throughout (docs/mapping.md, "Codes from DICOM code sequences"):

- a ``Coding`` carries a ``code`` only together with its ``system``: a DICOM code whose scheme has no known FHIR
  system keeps its meaning as text, never as a code without a system, and a ``Coding`` is never a display alone;
- ``Coding.display`` is the code system's own display or absent. The displays written here come from tables
  checked against their code systems (laterality, performer functions). A DICOM Code Meaning is the sender's
  (or DICOM's) wording, which the bridge cannot check against SNOMED CT or LOINC: it goes to
  ``CodeableConcept.text``, or is left out where the element is a bare ``Coding``.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.records import CodedConcept, RequestedReason

SNOMED_CT = "http://snomed.info/sct"
PARTICIPATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
URI_SYSTEM = "urn:ietf:rfc:3986"

# DICOM CodingSchemeDesignator -> FHIR code system URI (PS3.16 section 8 and the FHIR/HL7 terminology
# registry). Only schemes whose FHIR URI is certain are listed; any other designator, including the local
# "99..." ones, is kept as text.
CODING_SCHEME_SYSTEMS: dict[str, str] = {
    "SCT": SNOMED_CT,
    "LN": "http://loinc.org",
    "RADLEX": "http://www.radlex.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "C5": "http://www.ama-assn.org/go/cpt",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
}

# Systems whose Coding.version cannot carry a DICOM CodingSchemeVersion: a SNOMED CT version is a URI naming the
# edition's module and date (http://snomed.info/sct/{module}/version/{date}), which a DICOM version (a date, or
# "3.5") does not give; DICOM's own scheme has the fixed version "01", not a DICOM edition; a URN code has no
# scheme to version. Elsewhere (LOINC 2.74, RadLex 4.1, UCUM, ICD ...) the version is written the same way.
VERSION_NOT_EXPRESSIBLE = frozenset({SNOMED_CT, CODING_SCHEME_SYSTEMS["DCM"], URI_SYSTEM})

# Laterality (0020,0060) / ImageLaterality (0020,0062) -> SNOMED CT, DICOM CID 244. "U" (ImageLaterality:
# the body part is unpaired) has no laterality at all, so it maps to nothing; 66459002 "Unilateral" is not a
# value either attribute can state.
LATERALITY_CODES: dict[str, tuple[str, str]] = {
    "L": ("7771000", "Left"),
    "R": ("24028007", "Right"),
    "B": ("51440002", "Right and left"),
}

# The series performer's function, from v3-ParticipationType: the performing physician carries out the
# procedure (PRF, performer); the operator is the technologist assisting at the modality (SPRF).
PERFORMER_FUNCTIONS: dict[str, tuple[str, str]] = {
    "performing_physician": ("PRF", "performer"),
    "operator": ("SPRF", "secondary performer"),
}


def coding_system(scheme: str) -> str | None:
    """The FHIR system URI for a DICOM CodingSchemeDesignator; ``None`` when unknown."""
    return CODING_SCHEME_SYSTEMS.get(scheme.strip().upper())


def fhir_coding(concept: CodedConcept) -> FhirResource | None:
    """The FHIR ``Coding`` of a DICOM coded entry (system and code; no display, see the module's rules), or
    ``None`` when its scheme has no known FHIR system."""
    system = coding_system(concept.scheme) if concept.scheme else None
    if system is None and not concept.scheme and concept.code.startswith(("urn:", "http://", "https://")):
        system = URI_SYSTEM  # a URNCodeValue is its own system
    if system is None or not concept.code:
        return None
    coding: FhirResource = {"system": system}
    if concept.scheme_version and system not in VERSION_NOT_EXPRESSIBLE:
        coding["version"] = concept.scheme_version
    coding["code"] = concept.code
    return coding


def concept_text(concept: CodedConcept) -> str:
    """What a coded entry says in words: its Code Meaning, else its designator and code."""
    return concept.meaning or " ".join(part for part in (concept.scheme, concept.code) if part)


def codeable_concept(concept: CodedConcept) -> FhirResource:
    """A ``CodeableConcept``: the coding when the scheme is known, and the Code Meaning as ``text`` (the meaning,
    or designator and code, alone when the scheme is unknown)."""
    coding = fhir_coding(concept)
    if coding is None:
        return {"text": concept_text(concept)}
    return {"coding": [coding], "text": concept.meaning} if concept.meaning else {"coding": [coding]}


def reason_concept(reason: RequestedReason) -> FhirResource:
    """One ``CodeableConcept`` for one requested reason: the codings of its codes whose scheme is known, and its
    text. A reason stated as text and code is one concept, not two."""
    concept: FhirResource = {}
    codings = [coding for coding in (fhir_coding(code) for code in reason.codes) if coding is not None]
    if codings:
        concept["coding"] = codings
    # The requester's text; without one, the codes' meanings (the codes carry the concept, the words say it).
    text = reason.text or "; ".join(dict.fromkeys(concept_text(code) for code in reason.codes))
    if text:
        concept["text"] = text
    return concept


def laterality_coding(value: str) -> FhirResource | None:
    """The SNOMED CT ``Coding`` for a DICOM laterality value (R, L, B); ``None`` for anything else."""
    entry = LATERALITY_CODES.get(value.strip().upper())
    if entry is None:
        return None
    code, display = entry
    return {"system": SNOMED_CT, "code": code, "display": display}


def series_laterality(series_laterality: str, image_lateralities: list[str]) -> str:
    """The series' laterality value: its own Laterality, else what its images state together.

    Images of both sides (a bilateral mammogram series) give "B"; images of one side give that side.
    """
    own = series_laterality.strip().upper()
    if own in LATERALITY_CODES:
        return own
    sides = {value.strip().upper() for value in image_lateralities} & set(LATERALITY_CODES)
    if "B" in sides or {"L", "R"} <= sides:
        return "B"
    return sides.pop() if len(sides) == 1 else ""


def performer_function(role: str) -> FhirResource:
    code, display = PERFORMER_FUNCTIONS[role]
    return {"coding": [{"system": PARTICIPATION_TYPE_SYSTEM, "code": code, "display": display}]}


@dataclass(frozen=True, slots=True)
class BodySite:
    code: str  # SNOMED CT concept id
    meaning: str  # the DICOM Code Meaning Annex L gives it (not necessarily SNOMED CT's display)


# Annex L terms whose code means something else than the term (reviewed against DICOM CID 4 and the SNOMED CT
# concepts pydicom knows): they are not mapped, so bodySite says nothing rather than something wrong.
# - The Endo-* terms name an approach (an endorectal or endovaginal probe, a catheter): Annex L gives them the
#   code of the organ or vessel it passes through (ENDORECTAL is 34402009 Rectum, the same as RECTUM), while
#   what is examined is often another organ (the prostate, the uterus, the heart's chambers).
# - GESTSAC is 300571009 "Finding of gestational sac (finding)": a finding, not a body structure.
BODY_PARTS_NOT_MAPPED: dict[str, str] = {
    **{
        term: "an approach, coded as the organ or vessel it passes through"
        for term in (
            "ENDOARTERIAL",
            "ENDOCARDIAC",
            "ENDOESOPHAGEAL",
            "ENDONASAL",
            "ENDONASOPHARYNYX",
            "ENDORECTAL",
            "ENDORENAL",
            "ENDOURETERIC",
            "ENDOURETHRAL",
            "ENDOVAGINAL",
            "ENDOVASCULAR",
            "ENDOVENOUS",
            "ENDOVESICAL",
        )
    },
    "GESTSAC": "its code is a finding (Finding of gestational sac), not a body structure",
}


@functools.cache
def body_part_table() -> dict[str, BodySite]:
    """The BodyPartExamined -> SNOMED CT table shipped as package data (provenance in the file's header), without
    the terms in ``BODY_PARTS_NOT_MAPPED``."""
    text = resources.files("pacs_bridge.fhir").joinpath("data/body_part_examined.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {
        row["term"]: BodySite(code=row["code"], meaning=row["meaning"])
        for row in rows
        if row["term"] not in BODY_PARTS_NOT_MAPPED
    }


def body_site(body_part_examined: str) -> BodySite | None:
    """The Annex L entry for a BodyPartExamined term (case and padding ignored); ``None`` when unmapped or empty."""
    return body_part_table().get(body_part_examined.strip().upper())


def body_site_coding(body_part_examined: str) -> FhirResource | None:
    """The SNOMED CT ``Coding`` (system and code only) for a mapped BodyPartExamined term; ``None`` otherwise:
    an unmapped term has no code, and a ``Coding`` with a display alone means nothing and is found by no search."""
    site = body_site(body_part_examined)
    return None if site is None else {"system": SNOMED_CT, "code": site.code}


def body_site_text(body_part_examined: str) -> str:
    """The body part in words: the Annex L meaning of a mapped term, an unmapped term as the sender wrote it."""
    site = body_site(body_part_examined)
    return site.meaning if site is not None else body_part_examined.strip()
