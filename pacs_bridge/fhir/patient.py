"""PURE: the study's patient as FHIR: its identifier, the search that finds it, the minimal Patient to create.

``patient.mode`` (docs/mapping.md) decides how ImagingStudy.subject points at the patient:

- ``identifier``: a logical reference by identifier, nothing asked of the server;
- ``lookup``: the Patient the server finds by ``identifier=system|value``, when exactly one matches;
- ``create``: that Patient, created first when absent (conditional create, ``If-None-Exist``) from the study's
  PatientID, PatientName, PatientBirthDate and PatientSex; an existing one is never changed.

This module only builds values; the requests are the publisher's (``publish/patients.py``). A search needs an
identifier system: a value alone could match another issuer's patient with the same number, so an identifier
without a system is never searched (``identifier_search`` gives ``None``) and the subject stays a logical
reference.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote

from pacs_bridge.fhir.person_name import human_names
from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.records import StudyAttributes

PatientMode = Literal["identifier", "lookup", "create"]

# PatientSex (0010,0040) enumerated values -> FHIR administrative-gender. Another non-empty value says the sex
# is stated but not one DICOM defines: "unknown". Empty (Type 2, not known to the modality): no gender.
GENDERS = {"M": "male", "F": "female", "O": "other"}
UNKNOWN_GENDER = "unknown"

# FHIR search escaping (R4 3.1.1.5.7 / R5 3.2.1.5.7): these characters separate parts of a parameter value.
_SEARCH_SPECIAL = ("\\", "|", ",", "$")


def patient_identifier(
    study: StudyAttributes, *, identifier_system: str, issuer_systems: Mapping[str, str]
) -> FhirResource | None:
    """The patient's Identifier: PatientID with the system of its issuer; ``None`` without a PatientID.

    With an ``issuer_systems`` table, a listed IssuerOfPatientID gives its system and an unlisted one gives no
    system (and the issuer as ``assigner.display``), never another issuer's system; without IssuerOfPatientID,
    or without a table, ``identifier_system`` (none when empty).
    """
    if not study.patient_id:
        return None
    issuer = study.issuer_of_patient_id
    system = issuer_systems.get(issuer, "") if issuer and issuer_systems else identifier_system
    identifier: FhirResource = {}
    if system:
        identifier["system"] = system
    identifier["value"] = study.patient_id
    if issuer and not system and issuer_systems:
        identifier["assigner"] = {"display": issuer}  # an issuer we have no system for: say whose ID it is
    return identifier


def _escaped(text: str) -> str:
    for character in _SEARCH_SPECIAL:
        text = text.replace(character, "\\" + character)
    return text


def identifier_search(identifier: FhirResource | None) -> str | None:
    """The token for ``Patient?identifier=``: ``system|value``, search-escaped; ``None`` without a system.

    Without a system the value could be another issuer's number for another person: that is not searched.
    """
    if not identifier or not identifier.get("system") or not identifier.get("value"):
        return None
    return f"{_escaped(identifier['system'])}|{_escaped(identifier['value'])}"


def if_none_exist(search: str) -> str:
    """The ``If-None-Exist`` header of a conditional create for a search token: a URL query, so percent-encoded
    (a PatientID may hold ``&``, ``+``, ``#`` or spaces, which would otherwise change the query)."""
    return "identifier=" + quote(search, safe=":/|")


def patient_gender(patient_sex: str) -> str | None:
    """FHIR ``gender`` from PatientSex: M, F, O -> male, female, other; another value -> unknown; empty -> None."""
    sex = patient_sex.strip().upper()
    if not sex:
        return None
    return GENDERS.get(sex, UNKNOWN_GENDER)


def birth_date(patient_birth_date: str) -> str | None:
    """FHIR ``birthDate`` (YYYY-MM-DD) from a DICOM DA; ``None`` when empty or not a real calendar date.

    The ACR-NEMA form ``YYYY.MM.DD`` that old archives still send is read too.
    """
    text = patient_birth_date.strip()
    if len(text) == 10 and text[4] == text[7] == ".":
        text = text.replace(".", "")
    if len(text) != 8 or not text.isascii() or not text.isdigit():
        return None
    try:
        date = dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return date.isoformat()


def build_patient(study: StudyAttributes, identifier: FhirResource) -> FhirResource:
    """The minimal Patient the bridge creates when the server has none with ``identifier``: the identifier,
    the name, the birth date and the gender as the study states them; what it does not state is left out.

    No ``id``: the server assigns it (conditional create POSTs the resource).
    """
    patient: FhirResource = {"resourceType": "Patient", "identifier": [identifier]}
    names = human_names(study.patient_name)
    if names:
        patient["name"] = names
    gender = patient_gender(study.patient_sex)
    if gender is not None:
        patient["gender"] = gender
    born = birth_date(study.patient_birth_date)
    if born is not None:
        patient["birthDate"] = born
    return patient
