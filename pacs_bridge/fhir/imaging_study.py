"""Pure mapping: the index's ``StudySnapshot`` -> one FHIR ImagingStudy, R4 or R5 (a JSON-ready dict).

Deterministic: no clock, no I/O, no randomness, so the same snapshot always gives the same resource and the
same content hash, which is what lets the publisher send nothing when nothing changed. The mapping follows
the FHIR ImagingStudy <-> DICOM notes: UIDs as ``urn:oid:`` under the ``urn:dicom:uid`` system, the
accession number as an identifier of type ACSN (of the study, and of the ServiceRequest in ``basedOn``;
``fhir/accession.py``), SOP classes as ``urn:oid:`` codes under
``urn:ietf:rfc:3986``. Codes go through ``fhir/coding.py`` (never a code without a system), person names
through ``fhir/person_name.py``. docs/mapping.md lists every element with its DICOM source.

One builder serves both versions; where R5 reshaped an element, a small function shapes it for the version
(``_FhirShape``): modality as CodeableConcept, procedure / reason / series bodySite as CodeableReference,
series laterality as CodeableConcept. R5 has no ``interpreter``: the reading physicians go into the R4
element's cross-version extension (``INTERPRETER_EXTENSION``), the form R5 gives an element of another release.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Literal

from pacs_bridge.fhir.accession import AccessionMode, accession_identifier
from pacs_bridge.fhir.coding import (
    body_site_coding,
    body_site_text,
    codeable_concept,
    laterality_coding,
    performer_function,
    reason_concept,
    series_laterality,
)
from pacs_bridge.fhir.dicom_time import to_fhir_datetime
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.patient import PatientMode, patient_identifier
from pacs_bridge.fhir.person_name import render_person_name
from pacs_bridge.fhir.resource import FhirResource, fhir_id_for_uid
from pacs_bridge.records import (
    InstanceSnapshot,
    RejectionReason,
    SeriesSnapshot,
    StudyAttributes,
    StudySnapshot,
    StudyWithdrawal,
)

DICOM_UID_SYSTEM = "urn:dicom:uid"
DICOM_MODALITY_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
MISSING_PATIENT_ID_DISPLAY = "Patient ID absent from the DICOM study"

FhirVersion = Literal["R4", "R5"]
# R4's ImagingStudy.interpreter, carried in R5 (which dropped the element) by the FHIR cross-version extension
# for it: http://hl7.org/fhir/[release]/StructureDefinition/extension-[path] (R5 "Versions", hl7.fhir.uv.xver).
INTERPRETER_EXTENSION = "http://hl7.org/fhir/4.0/StructureDefinition/extension-ImagingStudy.interpreter"
IHE_IMR_IMAGING_STUDY = "https://profiles.ihe.net/RAD/IMR/StructureDefinition/imr-imagingstudy"
# Profiles the resource can claim (fhir.profile); fhir/validation.py checks the claim before sending.
PROFILE_URLS = {"ihe-imr": IHE_IMR_IMAGING_STUDY}


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingSettings:
    """What the mapping needs from the configuration."""

    endpoints: tuple[EndpointSettings, ...] = ()
    patient_identifier_system: str = ""
    # IssuerOfPatientID -> identifier system; when non-empty, a PatientID of an unlisted issuer gets no system.
    patient_issuer_systems: Mapping[str, str] = field(default_factory=dict)
    accession_identifier_system: str = ""
    # Issuer of Accession Number (LocalNamespaceEntityID or UniversalEntityID) -> identifier system; as for patients.
    accession_issuer_systems: Mapping[str, str] = field(default_factory=dict)
    # None: the host's local time zone rules, for DICOM times that carry no TimezoneOffsetFromUTC.
    site_zone: tzinfo | None = None
    # A literal reference (``Location/radiology-1``) for ImagingStudy.location; empty: no location.
    location_reference: str = ""
    fhir_version: FhirVersion = "R4"
    # False: series without their instance lists, for very large studies; the counts are always sent.
    include_instances: bool = True
    # "ihe-imr": claim the IHE IMR ImagingStudy profile in meta.profile (R4); "": no profile claimed.
    profile: str = ""
    # How subject finds the Patient (fhir/patient.py); the builder only takes the reference resolved for it.
    patient_mode: PatientMode = "identifier"
    # Whether basedOn also references the ServiceRequest found by the accession identifier (fhir/accession.py);
    # the builder only takes the reference resolved for it.
    accession_mode: AccessionMode = "identifier"


# DICOM CID 29 "Acquisition Modality" (PS3.16, as pydicom 3.0 ships it; a unit test compares the two): R4's and
# IHE IMR's ImagingStudy.modality lists "all series modality if actual acquisition modalities" (binding
# AcquisitionModality); R5's lists every distinct series modality (CID 33). SR, PR, KO, SEG... are not in it.
ACQUISITION_MODALITIES = frozenset(
    {
        "AR", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "DG", "DMS", "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES",
        "GM", "HD", "IO", "IVOCT", "IVUS", "KER", "LEN", "LS", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT",
        "OPTBSV", "OPTENF", "OPV", "OSS", "PA", "POS", "PT", "PX", "RESP", "RF", "RG", "RTIMAGE", "SM", "SRF", "TG",
        "US", "VA", "XA", "XC",
    }
)  # fmt: skip


def study_modalities(series_modalities: list[str], settings: MappingSettings) -> list[str]:
    """ImagingStudy.modality as each release defines it, from the study's distinct series modalities in order.

    R5: all of them. R4: the acquisition modalities (CID 29) only, so that a client reading a CT study's modality
    sees no SR (the ``modality`` search parameter itself reads ``series.modality``, in R4 as in R5); none for a
    study without one (a lone SR: R4's modality is 0..*). IHE IMR (R4) requires modality 1..*:
    a study without an acquisition modality then carries its series modalities, which IMR's extensible binding
    admits when no CID 29 code applies.
    """
    if settings.fhir_version == "R5":
        return series_modalities
    acquisition = [modality for modality in series_modalities if modality in ACQUISITION_MODALITIES]
    if acquisition or settings.profile != "ihe-imr":
        return acquisition
    return series_modalities


# ImagingStudy.status once IHE IOCM rejection notes withdrew every instance of the study (docs/mapping.md).
# entered-in-error: the study should never have existed as such (wrong patient, wrong order); cancelled: it
# existed, but none of it is available any more (poor quality, retention expired).
_STATUS_WHEN_WITHDRAWN = {
    RejectionReason.PATIENT_SAFETY: "entered-in-error",
    RejectionReason.INCORRECT_WORKLIST_ENTRY: "entered-in-error",
    RejectionReason.QUALITY: "cancelled",
    RejectionReason.RETENTION_EXPIRED: "cancelled",
}


def study_status(withdrawal: StudyWithdrawal | None) -> str:
    """``available``; for a withdrawn study ``entered-in-error`` if any of its notes says so, else ``cancelled``."""
    if withdrawal is None:
        return "available"
    statuses = {_STATUS_WHEN_WITHDRAWN[reason] for reason in withdrawal.reasons}
    return "entered-in-error" if "entered-in-error" in statuses else "cancelled"


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _modality_coding(code: str) -> dict[str, str]:
    return {"system": DICOM_MODALITY_SYSTEM, "code": code}


@dataclass(frozen=True, slots=True)
class _FhirShape:
    """The few elements whose type differs between R4 and R5; everything else is shared."""

    version: FhirVersion

    @property
    def is_r4(self) -> bool:
        return self.version == "R4"

    def coded(self, coding: FhirResource) -> FhirResource:
        """A Coding (R4 modality, laterality) or the CodeableConcept R5 made of it."""
        return coding if self.is_r4 else {"coding": [coding]}

    def concept(self, concept: FhirResource) -> FhirResource:
        """A CodeableConcept (R4 procedureCode, reasonCode) or the CodeableReference R5 made of it."""
        return concept if self.is_r4 else {"concept": concept}

    def body_site(self, body_part_examined: str) -> FhirResource | None:
        """R4: the SNOMED CT Coding of a mapped term (a Coding has no text: an unmapped term is left out). R5: a
        CodeableReference whose concept has the coding of a mapped term and the term in words as text."""
        if not body_part_examined.strip():
            return None
        coding = body_site_coding(body_part_examined)
        if self.is_r4:
            return coding
        concept: FhirResource = {"coding": [coding]} if coding is not None else {}
        return {"concept": {**concept, "text": body_site_text(body_part_examined)}}


def study_patient_identifier(study: StudyAttributes, settings: MappingSettings) -> FhirResource | None:
    """The Identifier of the study's patient under the configured systems; ``None`` without a PatientID."""
    return patient_identifier(
        study, identifier_system=settings.patient_identifier_system, issuer_systems=settings.patient_issuer_systems
    )


def study_accession_identifier(study: StudyAttributes, settings: MappingSettings) -> FhirResource | None:
    """The ACSN Identifier of the study's accession number under the configured systems; ``None`` without one."""
    return accession_identifier(
        study,
        identifier_system=settings.accession_identifier_system,
        issuer_systems=settings.accession_issuer_systems,
    )


def unmapped_issuers(study: StudyAttributes, settings: MappingSettings) -> tuple[tuple[str, str], ...]:
    """``(identifier, issuer)`` for each identifier of the study sent without a system because its dataset names
    an issuer the configuration does not map: ``("patient", IssuerOfPatientID)``, ``("accession", issuer)``. The
    publisher logs and counts them, so the operator sees which issuer to add to ``patient.issuers`` or
    ``accession.issuers``."""
    unmapped = []
    for kind, identifier in (
        ("patient", study_patient_identifier(study, settings)),
        ("accession", study_accession_identifier(study, settings)),
    ):
        if identifier is not None and "assigner" in identifier:
            unmapped.append((kind, str(identifier["assigner"]["display"])))
    return tuple(unmapped)


def _subject(study: StudyAttributes, settings: MappingSettings, patient_reference: str | None) -> FhirResource:
    identifier = study_patient_identifier(study, settings)
    if identifier is None:
        return {"type": "Patient", "display": MISSING_PATIENT_ID_DISPLAY}
    literal = {"reference": patient_reference} if patient_reference else {}
    return {**literal, "type": "Patient", "identifier": identifier}


def _based_on(accession: FhirResource | None, order_reference: str | None) -> list[FhirResource]:
    """The ServiceRequest the study fulfils, by its accession identifier, and by its literal reference when
    ``accession.mode`` lookup found it (``order_reference``)."""
    if accession is None:
        return []
    literal = {"reference": order_reference} if order_reference else {}
    return [{**literal, "type": "ServiceRequest", "identifier": accession}]


def _practitioner(pn: str) -> FhirResource | None:
    """A Reference to a practitioner known only by name (Reference.display); ``None`` for an empty name."""
    display = render_person_name(pn)
    return {"type": "Practitioner", "display": display} if display else None


def _practitioners(names: tuple[str, ...]) -> list[FhirResource]:
    references = (_practitioner(name) for name in names)
    return [reference for reference in references if reference is not None]


def _performers(series: SeriesSnapshot) -> list[FhirResource]:
    attributes = series.attributes
    performers = []
    for role, names in (
        ("performing_physician", attributes.performing_physicians),
        ("operator", attributes.operators),
    ):
        for actor in _practitioners(names):
            performers.append({"function": performer_function(role), "actor": actor})
    return performers


def _build_instance(instance: InstanceSnapshot) -> FhirResource:
    entry: FhirResource = {
        "uid": instance.sop_instance_uid,
        "sopClass": {"system": SOP_CLASS_SYSTEM, "code": _oid(instance.sop_class_uid)},
    }
    if instance.instance_number is not None:
        entry["number"] = instance.instance_number
    if instance.title:
        entry["title"] = instance.title
    return entry


def _build_series(
    series: SeriesSnapshot, shape: _FhirShape, settings: MappingSettings, timezone_offset: str
) -> FhirResource:
    attributes = series.attributes
    element: FhirResource = {"uid": attributes.series_uid}
    if attributes.series_number is not None:
        element["number"] = attributes.series_number
    element["modality"] = shape.coded(_modality_coding(attributes.modality))
    if attributes.series_description:
        element["description"] = attributes.series_description
    element["numberOfInstances"] = len(series.instances)
    body_site = shape.body_site(attributes.body_part_examined)
    if body_site is not None:
        element["bodySite"] = body_site
    laterality = laterality_coding(
        series_laterality(attributes.laterality, [instance.image_laterality for instance in series.instances])
    )
    if laterality is not None:
        element["laterality"] = shape.coded(laterality)
    started = to_fhir_datetime(attributes.series_date, attributes.series_time, timezone_offset, settings.site_zone)
    if started:
        element["started"] = started
    endpoints = [
        endpoint
        for endpoint in settings.endpoints
        if endpoint.serves_series(modality=attributes.modality, sending_ae_title=attributes.sending_ae_title)
    ]
    if endpoints:  # overrides a study endpoint of the same connection type, for this series
        element["endpoint"] = [{"reference": f"Endpoint/{endpoint.id}"} for endpoint in endpoints]
    performers = _performers(series)
    if performers:
        element["performer"] = performers
    if series.instances and settings.include_instances:
        element["instance"] = [_build_instance(instance) for instance in series.instances]
    return element


def imaging_study_id(study_uid: str) -> str:
    """The ImagingStudy's logical id, derived from the Study Instance UID alone (so every PUT is idempotent)."""
    return fhir_id_for_uid(study_uid)


def build_imaging_study(
    snapshot: StudySnapshot,
    settings: MappingSettings,
    *,
    patient_reference: str | None = None,
    order_reference: str | None = None,
) -> FhirResource:
    """The complete ImagingStudy (``settings.fhir_version``) for everything the index holds of one study.

    ``patient_reference``: the Patient found or created for the study (``Patient/123``, ``patient.mode`` lookup
    or create), added to subject beside its identifier; ``None``: subject is a logical reference by identifier.
    ``order_reference``: the ServiceRequest found by the accession identifier (``ServiceRequest/456``,
    ``accession.mode`` lookup), added to basedOn beside that identifier; ``None``: by identifier only.
    """
    study = snapshot.attributes
    shape = _FhirShape(settings.fhir_version)
    resource: FhirResource = {
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(study.study_uid),
    }
    if settings.profile:
        resource["meta"] = {"profile": [PROFILE_URLS[settings.profile]]}
    interpreters = _practitioners(study.reading_physicians)
    if interpreters and not shape.is_r4:
        resource["extension"] = [{"url": INTERPRETER_EXTENSION, "valueReference": actor} for actor in interpreters]
    accession = study_accession_identifier(study, settings)
    identifiers = [{"use": "official", "system": DICOM_UID_SYSTEM, "value": _oid(study.study_uid)}]
    if accession is not None:  # so that ImagingStudy?identifier=<accession number> finds the study
        identifiers.append(accession)
    resource |= {"identifier": identifiers, "status": study_status(snapshot.withdrawal)}
    modalities = list(dict.fromkeys(series.attributes.modality for series in snapshot.series))
    if not modalities and snapshot.withdrawal is not None:  # no series left: the modalities it had
        modalities = list(snapshot.withdrawal.modalities)
    modalities = study_modalities(modalities, settings)
    if modalities:
        resource["modality"] = [shape.coded(_modality_coding(code)) for code in modalities]
    resource["subject"] = _subject(study, settings, patient_reference)
    started = to_fhir_datetime(study.study_date, study.study_time, study.timezone_offset, settings.site_zone)
    if started:
        resource["started"] = started
    based_on = _based_on(accession, order_reference)
    if based_on:
        resource["basedOn"] = based_on
    referrer = _practitioner(study.referring_physician)
    if referrer is not None:
        resource["referrer"] = referrer
    if interpreters and shape.is_r4:  # R5: the cross-version extension above
        resource["interpreter"] = interpreters
    study_endpoints = [endpoint for endpoint in settings.endpoints if not endpoint.is_series_level]
    if study_endpoints:
        resource["endpoint"] = [{"reference": f"Endpoint/{endpoint.id}"} for endpoint in study_endpoints]
    resource["numberOfSeries"] = len(snapshot.series)
    resource["numberOfInstances"] = snapshot.number_of_instances
    if study.procedure_codes:
        procedures = [shape.concept(codeable_concept(code)) for code in study.procedure_codes]
        resource["procedureCode" if shape.is_r4 else "procedure"] = procedures
    if settings.location_reference:
        resource["location"] = {"reference": settings.location_reference}
    if study.reasons:
        reasons = [shape.concept(reason_concept(reason)) for reason in study.reasons]
        resource["reasonCode" if shape.is_r4 else "reason"] = reasons
    if study.study_description:
        resource["description"] = study.study_description
    if snapshot.series:
        resource["series"] = [
            _build_series(series, shape, settings, study.timezone_offset) for series in snapshot.series
        ]
    return resource
