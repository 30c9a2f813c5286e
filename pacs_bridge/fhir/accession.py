"""PURE: the study's accession number as a FHIR Identifier of type ACSN, with the system of its issuer.

ImagingStudy carries it twice (docs/mapping.md): in ``identifier``, where ``ImagingStudy?identifier=`` finds
the study by accession number, and in ``basedOn``, as the identifier of the ServiceRequest the study fulfils.
The system follows the rule of ``fhir/identifier.py``: ``accession.issuers`` by the issuer the Issuer of Accession
Number Sequence names (its LocalNamespaceEntityID, else its UniversalEntityID); ``accession.identifier_system``
only for a study that names no issuer; no system (the issuer as ``assigner.display``) for an issuer the
configuration does not map. ``accession_issued_system`` is that resolution alone, for whoever searches the order.

``accession.mode`` (``AccessionMode``) decides whether ``basedOn`` also points at the order itself: ``identifier``
(the default) sends the logical reference by identifier only; ``lookup`` adds the literal reference of the one
ServiceRequest the server finds by ``identifier=system|value`` (``publish/orders.py`` sends that search).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pacs_bridge.fhir.identifier import IssuedSystem, issued_identifier, issued_system
from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.records import StudyAttributes

IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACCESSION_TYPE_CODE = "ACSN"  # v2-0203 Accession ID: the type the ImagingStudy DICOM notes give the accession

AccessionMode = Literal["identifier", "lookup"]


def accession_issued_system(
    study: StudyAttributes, *, identifier_system: str, issuer_systems: Mapping[str, str]
) -> IssuedSystem:
    """The system of the study's AccessionNumber: ``issuer_systems`` by LocalNamespaceEntityID or else
    UniversalEntityID of its issuer; ``identifier_system`` only when the study names no issuer; none (and the
    issuer named in ``unmapped_issuer``) for an issuer the configuration does not map."""
    return issued_system(
        (study.accession_issuer_local_id, study.accession_issuer_universal_id),
        identifier_system=identifier_system,
        issuer_systems=issuer_systems,
    )


def accession_identifier(
    study: StudyAttributes, *, identifier_system: str, issuer_systems: Mapping[str, str]
) -> FhirResource | None:
    """``{type: ACSN, system, value}`` (``assigner`` instead of ``system`` for an unmapped issuer); ``None``
    without an AccessionNumber."""
    if not study.accession_number:
        return None
    issued = accession_issued_system(study, identifier_system=identifier_system, issuer_systems=issuer_systems)
    identifier_type = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": ACCESSION_TYPE_CODE}]}
    return {"type": identifier_type, **issued_identifier(study.accession_number, issued)}
