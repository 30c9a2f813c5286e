"""Pure builder for the FHIR Endpoint resources an ImagingStudy references.

Rules from the ImagingStudy implementation notes: WADO-RS and WADO-URI addresses are the service base URL
(scheme, authority, path) without a trailing slash; WADO-URI without query. Connection types come from
http://terminology.hl7.org/CodeSystem/endpoint-connection-type.

The payload type says what the Endpoint serves, coded as IHE IMR's Imaging Study Endpoint profile codes it:
DICOM 113014 "Study" for an Endpoint referenced from the study, 113015 "Series" for a series-level one. With
``profile="ihe-imr"`` an Endpoint whose connection type that profile admits (WADO-RS, IID) also claims it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_bridge.fhir.resource import FhirResource

CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
DICOM_CODE_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
STUDY_PAYLOAD = {"system": DICOM_CODE_SYSTEM, "code": "113014", "display": "Study"}
SERIES_PAYLOAD = {"system": DICOM_CODE_SYSTEM, "code": "113015", "display": "Series"}

# IHE IMR 1.1.0 "Imaging Study Endpoint": connectionType 1..1 from {ihe-iid, dicom-wado-rs} (required
# binding), payloadType 1..1 coded from DICOM (Study; Series in its series example).
IHE_IMR_IMAGING_STUDY_ENDPOINT = "https://profiles.ihe.net/RAD/IMR/StructureDefinition/imaging-study-endpoint"
IHE_IMR_CONNECTION_TYPES = frozenset({"dicom-wado-rs", "ihe-iid"})

# connection type -> (display, payload MIME types)
CONNECTION_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dicom-wado-rs": ("DICOM WADO-RS", ("application/dicom",)),
    "dicom-wado-uri": ("DICOM WADO-URI", ("application/dicom",)),
    "dicom-qido-rs": ("DICOM QIDO-RS", ("application/dicom+json",)),
    "dicom-stow-rs": ("DICOM STOW-RS", ("application/dicom",)),
    "ihe-iid": ("IHE IID", ("text/html",)),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSettings:
    """One configured Endpoint: its FHIR id, connection type code and base address."""

    id: str
    connection_type: str
    address: str
    name: str = ""
    # Either non-empty: a series-level endpoint, referenced from the series of these modalities or sent by
    # these calling AE titles, and not from the study.
    series_modalities: tuple[str, ...] = ()
    series_calling_aets: tuple[str, ...] = ()

    @property
    def is_series_level(self) -> bool:
        return bool(self.series_modalities or self.series_calling_aets)

    def serves_series(self, *, modality: str, sending_ae_title: str) -> bool:
        """Whether a series of ``modality``, first sent by ``sending_ae_title``, references this endpoint."""
        return modality in self.series_modalities or (
            bool(sending_ae_title) and sending_ae_title in self.series_calling_aets
        )


def normalized_address(address: str) -> str:
    """The base address as the Endpoint rules want it: no trailing slash."""
    return address.rstrip("/")


def build_endpoint(settings: EndpointSettings, *, fhir_version: str = "R4", profile: str = "") -> FhirResource:
    """The Endpoint resource for one configured endpoint, R4 or R5 (R5 made connectionType a list of
    CodeableConcept and moved the payload type and MIME types into ``payload``)."""
    display, mime_types = CONNECTION_TYPES[settings.connection_type]
    connection_type = {"system": CONNECTION_TYPE_SYSTEM, "code": settings.connection_type, "display": display}
    payload_type = {"coding": [dict(SERIES_PAYLOAD if settings.is_series_level else STUDY_PAYLOAD)]}
    resource: FhirResource = {"resourceType": "Endpoint", "id": settings.id}
    if profile == "ihe-imr" and settings.connection_type in IHE_IMR_CONNECTION_TYPES:
        resource["meta"] = {"profile": [IHE_IMR_IMAGING_STUDY_ENDPOINT]}
    resource["status"] = "active"
    if fhir_version == "R5":
        resource["connectionType"] = [{"coding": [connection_type]}]
        resource["payload"] = [{"type": [payload_type], "mimeType": list(mime_types)}]
    else:
        resource["connectionType"] = connection_type
        resource["payloadType"] = [payload_type]
        resource["payloadMimeType"] = list(mime_types)
    resource["address"] = normalized_address(settings.address)
    if settings.name:
        resource["name"] = settings.name
    return resource
