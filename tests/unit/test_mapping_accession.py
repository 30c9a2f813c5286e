"""The accession number in ImagingStudy.identifier as well as in basedOn (issue 15 item 1), with the system of
its issuer (Issuer of Accession Number Sequence, accession.issuers) under the same never-guess rule as patients."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pacs_bridge.config import parse_config
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.accession import accession_identifier, accession_issued_system
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.identifier import IssuedSystem, identifier_search
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study, unmapped_issuers
from pacs_bridge.fhir.validation import resource_problems
from pacs_bridge.records import StudyAttributes
from pacs_bridge.wiring import mapping_settings
from tests.support.studies import make_dataset
from tests.unit.test_extract import encode
from tests.unit.test_imaging_study import ct_one_series_snapshot

OURS = "http://hospital.example.org/accession"
RIS_B = "urn:oid:1.2.3.5"
ISSUERS = {"RIS-B": RIS_B, "1.2.3.6": "urn:oid:1.2.3.6"}
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def study(local: str = "", universal: str = "", accession: str = "ACC-0001") -> StudyAttributes:
    return StudyAttributes(
        study_uid="1.2.3",
        accession_number=accession,
        accession_issuer_local_id=local,
        accession_issuer_universal_id=universal,
    )


@pytest.mark.parametrize(
    ("local", "universal", "issuers", "expected"),
    [
        # no issuer named: accession.identifier_system
        ("", "", {}, {"system": OURS}),
        ("", "", ISSUERS, {"system": OURS}),
        # an issuer listed by its LocalNamespaceEntityID, or by its UniversalEntityID
        ("RIS-B", "", ISSUERS, {"system": RIS_B}),
        ("", "1.2.3.6", ISSUERS, {"system": "urn:oid:1.2.3.6"}),
        ("RIS-X", "1.2.3.6", ISSUERS, {"system": "urn:oid:1.2.3.6"}),  # the universal id is listed
        ("RIS-B", "1.2.3.6", ISSUERS, {"system": RIS_B}),  # both listed: the local name first
        # an issuer not listed, with or without a table: no system, never identifier_system
        ("RIS-C", "", ISSUERS, {"assigner": {"display": "RIS-C"}}),
        ("RIS-C", "", {}, {"assigner": {"display": "RIS-C"}}),
        ("", "9.9.9", {}, {"assigner": {"display": "9.9.9"}}),
    ],
)
def test_accession_identifier_system_follows_its_issuer(
    local: str, universal: str, issuers: dict[str, str], expected: dict[str, Any]
) -> None:
    """The issuer table picks the system; an issuer it does not list never gets the configured one."""
    identifier = accession_identifier(study(local, universal), identifier_system=OURS, issuer_systems=issuers)

    assert identifier == {
        "type": ACSN,
        **({"system": expected["system"]} if "system" in expected else {}),
        "value": "ACC-0001",
        **({"assigner": expected["assigner"]} if "assigner" in expected else {}),
    }


def test_the_resolution_alone_names_the_unmapped_issuer() -> None:
    """accession_issued_system: what a ServiceRequest lookup needs, system or the reason there is none."""
    assert accession_issued_system(study("RIS-C"), identifier_system=OURS, issuer_systems=ISSUERS) == IssuedSystem(
        system="", unmapped_issuer="RIS-C"
    )
    assert accession_issued_system(study(), identifier_system=OURS, issuer_systems={}) == IssuedSystem(system=OURS)


def test_an_accession_of_an_unmapped_issuer_is_never_searched() -> None:
    """Without a system there is no search token, as for a patient."""
    identifier = accession_identifier(study("RIS-C"), identifier_system=OURS, issuer_systems={})

    assert identifier_search(identifier) is None


def test_no_accession_number_gives_no_identifier() -> None:
    assert accession_identifier(study(accession=""), identifier_system=OURS, issuer_systems=ISSUERS) is None


def with_accession(**attributes: Any) -> Any:
    snapshot = ct_one_series_snapshot()
    return dataclasses.replace(snapshot, attributes=dataclasses.replace(snapshot.attributes, **attributes))


SETTINGS = MappingSettings(accession_identifier_system=OURS, accession_issuer_systems=ISSUERS)


@pytest.mark.parametrize("fhir_version", ["R4", "R5"])
def test_imaging_study_carries_the_accession_in_identifier_and_in_based_on(fhir_version: Any) -> None:
    """identifier = [Study UID, accession (ACSN)]; basedOn's ServiceRequest has the same identifier."""
    resource = build_imaging_study(
        with_accession(accession_issuer_local_id="RIS-B"), dataclasses.replace(SETTINGS, fhir_version=fhir_version)
    )

    accession = {"type": ACSN, "system": RIS_B, "value": "ACC-0001"}
    assert resource["identifier"] == [
        {"use": "official", "system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.10.1482.1"},
        accession,
    ]
    assert resource["basedOn"] == [{"type": "ServiceRequest", "identifier": accession}]
    assert resource_problems(resource, fhir_version=fhir_version) == []


def test_without_accession_number_only_the_study_uid_is_an_identifier() -> None:
    resource = build_imaging_study(with_accession(accession_number=""), SETTINGS)

    assert [identifier["system"] for identifier in resource["identifier"]] == ["urn:dicom:uid"]
    assert "basedOn" not in resource


def test_ihe_imr_mode_keeps_exactly_one_study_uid_identifier() -> None:
    """IMR slices identifier by system urn:dicom:uid (studyUID 1..1, open): the ACSN identifier beside it
    conforms, with or without a system."""
    wado = EndpointSettings(id="wado", connection_type="dicom-wado-rs", address="https://pacs.example.org/dicom-web")
    imr = dataclasses.replace(SETTINGS, profile="ihe-imr", endpoints=(wado,))
    for attributes in ({}, {"accession_issuer_local_id": "RIS-C"}):
        resource = build_imaging_study(with_accession(**attributes), imr)

        assert len(resource["identifier"]) == 2
        assert resource_problems(resource, fhir_version="R4", endpoint_types={"wado": "dicom-wado-rs"}) == []


def test_unmapped_accession_issuer_is_reported_for_the_log_and_the_metric() -> None:
    assert unmapped_issuers(with_accession(accession_issuer_local_id="RIS-C").attributes, SETTINGS) == (
        ("accession", "RIS-C"),
    )
    assert unmapped_issuers(with_accession(accession_issuer_local_id="RIS-B").attributes, SETTINGS) == ()


# ---- DICOM: Issuer of Accession Number Sequence (0008,0051) --------------------------------------------------------


def issuer_item(local: str | None, universal: str | None = None) -> Dataset:
    item = Dataset()
    if local is not None:
        item.LocalNamespaceEntityID = local
    if universal is not None:
        item.UniversalEntityID = universal
        item.UniversalEntityIDType = "ISO"
    return item


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([issuer_item("RIS-B")], ("RIS-B", "")),
        ([issuer_item(None, "1.2.3.6")], ("", "1.2.3.6")),
        ([issuer_item("RIS-B", "1.2.3.6")], ("RIS-B", "1.2.3.6")),
        ([], ("", "")),  # present but empty
        (None, ("", "")),  # absent
    ],
)
def test_the_listener_reads_the_issuer_of_accession_number_from_the_wire(
    items: list[Dataset] | None, expected: tuple[str, str]
) -> None:
    """Through the listener's header reader, as a C-STORE delivers it: LocalNamespaceEntityID, UniversalEntityID."""
    ds = make_dataset(IssuerOfAccessionNumberSequence=items)

    record = extract_instance(read_header(BytesIO(encode(ds)), ExplicitVRLittleEndian))

    assert (record.study.accession_issuer_local_id, record.study.accession_issuer_universal_id) == expected


# ---- configuration ---------------------------------------------------------------------------------------------


def config_with(**sections: Any) -> Any:
    return parse_config({"fhir": {"base_url": "http://fhir.example.org"}, **sections}, path="test.yaml")


def test_config_accession_issuers_reach_the_mapping() -> None:
    config = config_with(accession={"identifier_system": OURS, "issuers": {"RIS-B": RIS_B}})

    settings = mapping_settings(config)

    assert (settings.accession_identifier_system, dict(settings.accession_issuer_systems)) == (OURS, {"RIS-B": RIS_B})


@pytest.mark.parametrize(
    ("sections", "where", "says"),
    [
        ({"accession": {"issuers": {"RIS-B": "urn oid 1"}}}, "at 'accession.issuers'", "for issuer 'RIS-B'"),
        ({"accession": {"identifier_system": "urn:dicom:uid"}}, "at 'accession.identifier_system'", "Study Instance"),
        ({"accession": {"issuers": {"RIS-B": "urn:dicom:uid"}}}, "at 'accession.issuers'", "Study Instance UIDs"),
        ({"patient": {"identifier_system": "urn:dicom:uid"}}, "at 'patient.identifier_system'", "Study Instance"),
        ({"patient": {"identifier_system": "urn: oid"}}, "at 'patient.identifier_system'", "without spaces"),
    ],
)
def test_config_refuses_systems_that_are_not_an_issuers_namespace(
    sections: dict[str, Any], where: str, says: str
) -> None:
    """A system with spaces is no URI; urn:dicom:uid would pass the accession off as the study's UID."""
    with pytest.raises(ConfigError) as caught:
        config_with(**sections)

    assert where in str(caught.value)
    assert says in str(caught.value)
