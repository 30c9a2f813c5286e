"""PURE: the study's patient as FHIR: its identifier, the search that finds it, the minimal Patient to create.

``patient.mode`` (docs/mapping.md) decides how ImagingStudy.subject points at the patient:

- ``identifier``: a logical reference by identifier, nothing asked of the server;
- ``lookup``: the Patient the server finds by ``identifier=system|value``, when exactly one matches;
- ``create``: that Patient, created first when absent (conditional create, ``If-None-Exist``) from the study's
  PatientID, PatientName, PatientBirthDate and PatientSex; an existing one is never changed.

This module only builds values; the requests are the publisher's (``publish/patients.py``). The identifier's
system follows ``fhir/identifier.py``: a PatientID whose IssuerOfPatientID the configuration does not map gets no
system, and an identifier without a system is never searched (``identifier_search`` gives ``None``), so the
subject stays a logical reference: a value alone could match another issuer's patient with the same number.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote

from pacs_bridge.fhir.identifier import IssuedSystem, issued_identifier, issued_system
from pacs_bridge.fhir.person_name import human_names
from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.records import StudyAttributes

PatientMode = Literal["identifier", "lookup", "create"]

# PatientSex (0010,0040) enumerated values -> FHIR administrative-gender. Another non-empty value says the sex
# is stated but not one DICOM defines: "unknown". Empty (Type 2, not known to the modality): no gender.
GENDERS = {"M": "male", "F": "female", "O": "other"}
UNKNOWN_GENDER = "unknown"


def patient_issued_system(
    study: StudyAttributes, *, identifier_system: str, issuer_systems: Mapping[str, str]
) -> IssuedSystem:
    """The system of the study's PatientID: ``issuer_systems[IssuerOfPatientID]``; ``identifier_system`` only for
    a study that names no issuer; none for an issuer the configuration does not map (``fhir/identifier.py``)."""
    return issued_system(
        (study.issuer_of_patient_id,), identifier_system=identifier_system, issuer_systems=issuer_systems
    )


def patient_identifier(
    study: StudyAttributes, *, identifier_system: str, issuer_systems: Mapping[str, str]
) -> FhirResource | None:
    """The patient's Identifier: PatientID with the system of its issuer; ``None`` without a PatientID.

    An IssuerOfPatientID the configuration does not map gives no system and the issuer as ``assigner.display``,
    never ``identifier_system`` nor another issuer's system.
    """
    if not study.patient_id:
        return None
    issued = patient_issued_system(study, identifier_system=identifier_system, issuer_systems=issuer_systems)
    return issued_identifier(study.patient_id, issued)


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
