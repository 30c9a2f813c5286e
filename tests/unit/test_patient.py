"""The pure part of patient.mode: the Patient the bridge would create, the search that finds it, the subject."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fhir.resources.patient import Patient as PatientR5
from fhir.resources.R4B.patient import Patient as PatientR4

from pacs_bridge.cli import main
from pacs_bridge.config import config_warnings, parse_config
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.identifier import identifier_search
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study
from pacs_bridge.fhir.patient import (
    birth_date,
    build_patient,
    if_none_exist,
    patient_gender,
    patient_identifier,
)
from pacs_bridge.fhir.person_name import NAME_REPRESENTATION_URL
from pacs_bridge.fhir.validation import resource_problems
from pacs_bridge.records import StudyAttributes
from pacs_bridge.wiring import mapping_settings
from tests.support.studies import make_dataset
from tests.unit.test_extract import from_wire
from tests.unit.test_imaging_study import ct_one_series_snapshot

SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
IDENTIFIER = {"system": SYSTEM, "value": "PAT-0001"}


def study(**attributes: Any) -> StudyAttributes:
    return StudyAttributes(study_uid="1.2.3", patient_id="PAT-0001", **attributes)


def representation(code: str) -> list[dict[str, str]]:
    return [{"url": NAME_REPRESENTATION_URL, "valueCode": code}]


# ---- gender, birth date, names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patient_sex", "gender"),
    [
        ("M", "male"),
        ("F", "female"),
        ("O", "other"),  # DICOM's "other" is FHIR's
        ("f", "female"),  # lower case from a lenient modality
        (" M ", "male"),  # padding
        ("U", "unknown"),  # stated, but not a DICOM value: unknown, not a guess
        ("X", "unknown"),
        ("", None),  # Type 2 and empty: no gender element at all
    ],
)
def test_patient_sex_gives_the_administrative_gender(patient_sex: str, gender: str | None) -> None:
    """M, F, O map to male, female, other; another stated value is unknown; empty gives no gender."""
    assert patient_gender(patient_sex) == gender


@pytest.mark.parametrize(
    ("patient_birth_date", "expected"),
    [
        ("19700102", "1970-01-02"),
        ("20000229", "2000-02-29"),  # a leap day
        ("1970.01.02", "1970-01-02"),  # ACR-NEMA form still sent by old archives
        ("", None),  # missing birth date: no birthDate
        ("19700230", None),  # not a calendar date
        ("1970", None),  # partial: DA has no partial dates; left out rather than guessed
        ("197001xx", None),
        ("19700102-19700103", None),  # a range belongs in queries, not in a dataset
    ],
)
def test_birth_date_is_a_fhir_date_or_absent(patient_birth_date: str, expected: str | None) -> None:
    """A valid DA becomes YYYY-MM-DD; anything else is left out, never guessed."""
    assert birth_date(patient_birth_date) == expected


@pytest.mark.parametrize(
    ("patient_name", "names"),
    [
        # family and given
        ("Doe^Jane", [{"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}]),
        # every component: middle names join given, prefix and suffix are lists
        (
            "Doe^Jane^Quinn^Dr^PhD",
            [
                {
                    "text": "Dr Jane Quinn Doe PhD",
                    "family": "Doe",
                    "given": ["Jane", "Quinn"],
                    "prefix": ["Dr"],
                    "suffix": ["PhD"],
                }
            ],
        ),
        # family name only
        ("Doe", [{"text": "Doe"}]),
        ("Doe^", [{"text": "Doe", "family": "Doe"}]),
        # Latin-1 letters arrive decoded and are kept
        ("Müller^Jürgen", [{"text": "Jürgen Müller", "family": "Müller", "given": ["Jürgen"]}]),
        # UTF-8: a Greek name
        ("Παπαδόπουλος^Νίκος", [{"text": "Νίκος Παπαδόπουλος", "family": "Παπαδόπουλος", "given": ["Νίκος"]}]),
        # three component groups (ISO 2022 IR 87): one HumanName each, saying which representation it is
        (
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            [
                {"extension": representation("ABC"), "text": "Tarou Yamada", "family": "Yamada", "given": ["Tarou"]},
                {"extension": representation("IDE"), "text": "山田 太郎", "family": "山田", "given": ["太郎"]},
                {"extension": representation("SYL"), "text": "やまだ たろう", "family": "やまだ", "given": ["たろう"]},
            ],
        ),
        # ideographic only: a single name, no representation needed
        ("=山田^太郎", [{"text": "山田 太郎", "family": "山田", "given": ["太郎"]}]),
        # free text without separators is kept as text only
        ("Jane Doe", [{"text": "Jane Doe"}]),
        # no name
        ("", []),
        ("^^^^", []),
    ],
)
def test_patient_name_becomes_human_names(patient_name: str, names: list[dict[str, Any]]) -> None:
    """Each PN component group gives one HumanName with its parts and readable text."""
    patient = build_patient(study(patient_name=patient_name), IDENTIFIER)

    assert patient.get("name", []) == names


def test_minimal_patient_carries_identifier_name_gender_and_birth_date() -> None:
    """The whole resource, and no id: the server assigns it."""
    patient = build_patient(
        study(patient_name="Doe^Jane", patient_birth_date="19700102", patient_sex="F"),
        {"system": SYSTEM, "value": "PAT-0001"},
    )

    assert patient == {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": "PAT-0001"}],
        "name": [{"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}],
        "gender": "female",
        "birthDate": "1970-01-02",
    }


def test_patient_with_nothing_but_its_id_has_only_the_identifier() -> None:
    """No name, birth date or sex in the study: none invented."""
    assert build_patient(study(), IDENTIFIER) == {"resourceType": "Patient", "identifier": [IDENTIFIER]}


PATIENTS = {
    "full": study(patient_name="Doe^Jane^Quinn^Dr^PhD", patient_birth_date="19700102", patient_sex="F"),
    "japanese": study(patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう", patient_sex="M"),
    "unknown-sex-no-birth-date": study(patient_name="Jane Doe", patient_sex="U"),
    "identifier-only": study(),
}


@pytest.mark.parametrize("fhir_version", ["R4", "R5"])
@pytest.mark.parametrize("name", sorted(PATIENTS))
def test_minimal_patient_is_valid_r4_and_r5(name: str, fhir_version: str) -> None:
    """The fhir.resources models (R4B for R4) and the gender binding accept every Patient built."""
    patient = build_patient(PATIENTS[name], IDENTIFIER)

    assert resource_problems(patient, fhir_version=fhir_version) == []
    model = PatientR4 if fhir_version == "R4" else PatientR5
    assert model.model_validate(patient).model_dump(mode="json", exclude_none=True) == patient


def test_a_gender_outside_the_value_set_is_a_validation_problem() -> None:
    """Patient.gender is a required binding: the check the models do not make is ours."""
    patient = {"resourceType": "Patient", "gender": "F"}

    assert resource_problems(patient, fhir_version="R4") == [
        "gender: 'F' is not in the required value set (female, male, other, unknown)"
    ]


# ---- identifier and search -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identifier", "search"),
    [
        ({"system": SYSTEM, "value": "PAT-0001"}, f"{SYSTEM}|PAT-0001"),
        # search-special characters in a PatientID are escaped, so the value is not split
        ({"system": SYSTEM, "value": r"A|B,C$D\E"}, f"{SYSTEM}|A\\|B\\,C\\$D\\\\E"),
        # no system: never searched (another issuer's patient may carry the same number)
        ({"value": "PAT-0001"}, None),
        ({"value": "PAT-0001", "assigner": {"display": "HOSP-C"}}, None),
        (None, None),  # no PatientID
    ],
)
def test_identifier_search_needs_a_system(identifier: dict[str, Any] | None, search: str | None) -> None:
    """system|value, escaped; None when the identifier has no system."""
    assert identifier_search(identifier) == search


@pytest.mark.parametrize(
    ("search", "header"),
    [
        (f"{SYSTEM}|PAT-0001", f"identifier={SYSTEM}|PAT-0001"),
        ("http://hospital.example.org/mrn|A+B 1&2#3", "identifier=http://hospital.example.org/mrn|A%2BB%201%262%233"),
        (f"{SYSTEM}|Müller", f"identifier={SYSTEM}|M%C3%BCller"),
    ],
)
def test_if_none_exist_is_a_percent_encoded_query(search: str, header: str) -> None:
    """Characters that would end or change the query (&, +, #, space) and non-ASCII are percent-encoded."""
    assert if_none_exist(search) == header


@pytest.mark.parametrize(
    ("issuer", "issuers", "identifier"),
    [
        ("", {}, {"system": SYSTEM, "value": "PAT-0001"}),
        ("HOSP-A", {"HOSP-A": "urn:oid:1.2.3.4"}, {"system": "urn:oid:1.2.3.4", "value": "PAT-0001"}),
        ("HOSP-C", {"HOSP-A": "urn:oid:1.2.3.4"}, {"value": "PAT-0001", "assigner": {"display": "HOSP-C"}}),
    ],
)
def test_patient_identifier_takes_the_system_of_its_issuer(
    issuer: str, issuers: dict[str, str], identifier: dict[str, Any]
) -> None:
    """The same rule as the subject's identifier (patient.issuers, then identifier_system)."""
    attributes = study(issuer_of_patient_id=issuer)

    assert patient_identifier(attributes, identifier_system=SYSTEM, issuer_systems=issuers) == identifier


def test_no_patient_id_gives_no_identifier() -> None:
    assert patient_identifier(StudyAttributes(study_uid="1.2.3"), identifier_system=SYSTEM, issuer_systems={}) is None


# ---- the ImagingStudy's subject --------------------------------------------------------------------------------


@pytest.mark.parametrize("fhir_version", ["R4", "R5"])
def test_resolved_patient_is_a_literal_reference_beside_the_identifier(fhir_version: Any) -> None:
    """subject = {reference: Patient/<id>, type, identifier}: the literal reference and the identifier."""
    settings = MappingSettings(patient_identifier_system=SYSTEM, fhir_version=fhir_version, patient_mode="lookup")

    resource = build_imaging_study(ct_one_series_snapshot(), settings, patient_reference="Patient/p-42")

    assert resource["subject"] == {
        "reference": "Patient/p-42",
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": "PAT-0001"},
    }
    assert resource_problems(resource, fhir_version=fhir_version) == []


def test_without_a_resolved_patient_the_subject_is_the_identifier_alone() -> None:
    """identifier mode, or a lookup that fell back: no reference element."""
    settings = MappingSettings(patient_identifier_system=SYSTEM)

    assert build_imaging_study(ct_one_series_snapshot(), settings)["subject"] == {
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": "PAT-0001"},
    }


# ---- configuration ---------------------------------------------------------------------------------------------


def config_with(patient: dict[str, Any]) -> Any:
    return parse_config({"fhir": {"base_url": "http://fhir.example.org"}, "patient": patient}, path="test.yaml")


@pytest.mark.parametrize("mode", ["lookup", "create"])
def test_lookup_and_create_without_any_identifier_system_are_refused(mode: str) -> None:
    """A search by PatientID alone could find another issuer's patient: check-config says which key to set."""
    with pytest.raises(ConfigError) as caught:
        config_with({"mode": mode})

    assert f"at 'patient.mode': {mode} searches the FHIR server by identifier system and value" in str(caught.value)
    assert "patient.identifier_system" in str(caught.value)


@pytest.mark.parametrize(
    "patient",
    [
        {"mode": "lookup", "identifier_system": SYSTEM},
        {"mode": "create", "identifier_system": SYSTEM},
        {"mode": "create", "issuers": {"HOSP-A": "urn:oid:1.2.3.4"}},  # systems by issuer are enough
        {"mode": "identifier"},  # needs no system: the identifier is not searched
        {},
    ],
)
def test_patient_mode_reaches_the_mapping(patient: dict[str, Any]) -> None:
    """patient.mode (default identifier) becomes MappingSettings.patient_mode."""
    assert mapping_settings(config_with(patient)).patient_mode == patient.get("mode", "identifier")


@pytest.mark.parametrize("mode", ["lookup", "create"])
def test_lookup_and_create_without_an_issuers_table_are_warned_about(mode: str) -> None:
    """Valid, but studies naming an IssuerOfPatientID will never be linked: the warning names patient.issuers."""
    (warning,) = config_warnings(config_with({"mode": mode, "identifier_system": SYSTEM}))

    assert warning.startswith(f"at 'patient.issuers': patient.mode {mode} runs without an issuers table")
    assert "never searched, linked or created" in warning


@pytest.mark.parametrize(
    "patient",
    [
        {"mode": "lookup", "identifier_system": SYSTEM, "issuers": {"HOSP-A": SYSTEM}},  # the table is there
        {"mode": "identifier", "identifier_system": SYSTEM},  # nothing is searched
        {},
    ],
)
def test_no_warning_when_an_issuers_table_is_set_or_nothing_is_searched(patient: dict[str, Any]) -> None:
    assert config_warnings(config_with(patient)) == []


def test_check_config_prints_the_warning_and_still_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file is valid (stdout says so, exit 0); the warning goes to stderr with the file name."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        f"fhir:\n  base_url: http://fhir.example.org\npatient:\n  mode: lookup\n  identifier_system: {SYSTEM}\n",
        encoding="utf-8",
    )

    main(["check-config", "--config", str(path)])

    out, err = capsys.readouterr()
    assert out == f"{path}: configuration is valid\n"
    assert f"\n{path}: warning: at 'patient.issuers': patient.mode lookup runs without an issuers" in err


def test_an_unknown_patient_mode_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        config_with({"mode": "merge", "identifier_system": SYSTEM})

    assert "at 'patient.mode'" in str(caught.value)
    assert "'merge'" in str(caught.value)


# ---- extraction ------------------------------------------------------------------------------------------------


def test_patient_name_birth_date_and_sex_are_extracted() -> None:
    """The three attributes the created Patient needs reach the record as received."""
    # lower case from a lenient modality, as raw bytes (pydicom refuses to set it in code)
    attributes = extract_instance(from_wire(make_dataset(PatientBirthDate="19700102"), PatientSex=b"f ")).study

    assert (attributes.patient_name, attributes.patient_birth_date, attributes.patient_sex) == (
        "Doe^Jane",
        "19700102",
        "F",
    )


def test_a_non_ascii_birth_date_leaves_the_birth_date_empty_and_the_instance_accepted() -> None:
    """A value only the created Patient uses never refuses the instance: it is left out instead."""
    wire = from_wire(make_dataset(PatientSex="F"), PatientBirthDate=b"19\xe90102")

    attributes = extract_instance(wire).study

    assert (attributes.patient_birth_date, attributes.patient_sex) == ("", "F")
