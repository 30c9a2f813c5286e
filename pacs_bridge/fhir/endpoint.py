"""Pure builder for the FHIR Endpoint resources an ImagingStudy references.

Rules from the ImagingStudy implementation notes: WADO-RS and WADO-URI addresses are the service base URL
(scheme, authority, path) without a trailing slash; WADO-URI without query. Connection types come from
http://terminology.hl7.org/CodeSystem/endpoint-connection-type.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_bridge.fhir.resource import FhirResource

CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"

# connection type -> (display, payload type text, payload MIME types)
CONNECTION_TYPES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dicom-wado-rs": ("DICOM WADO-RS", "DICOM WADO-RS", ("application/dicom",)),
    "dicom-wado-uri": ("DICOM WADO-URI", "DICOM WADO-URI", ("application/dicom",)),
    "dicom-qido-rs": ("DICOM QIDO-RS", "DICOM QIDO-RS", ("application/dicom+json",)),
    "dicom-stow-rs": ("DICOM STOW-RS", "DICOM STOW-RS", ("application/dicom",)),
    "ihe-iid": ("IHE IID", "IHE IID", ("text/html",)),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSettings:
    """One configured Endpoint: its FHIR id, connection type code and base address."""

    id: str
    connection_type: str
    address: str
    name: str = ""
    # Non-empty: a series-level endpoint, referenced from the series of these modalities, not from the study.
    series_modalities: tuple[str, ...] = ()


def normalized_address(address: str) -> str:
    """The base address as the Endpoint rules want it: no trailing slash."""
    return address.rstrip("/")


def build_endpoint(settings: EndpointSettings, *, fhir_version: str = "R4") -> FhirResource:
    """The Endpoint resource for one configured endpoint, R4 or R5 (R5 made connectionType a list of
    CodeableConcept and moved the payload type and MIME types into ``payload``)."""
    display, payload_text, mime_types = CONNECTION_TYPES[settings.connection_type]
    if fhir_version == "R5":
        resource_r5: FhirResource = {
            "resourceType": "Endpoint",
            "id": settings.id,
            "status": "active",
            "connectionType": [
                {"coding": [{"system": CONNECTION_TYPE_SYSTEM, "code": settings.connection_type, "display": display}]}
            ],
            "payload": [{"type": [{"text": payload_text}], "mimeType": list(mime_types)}],
            "address": normalized_address(settings.address),
        }
        if settings.name:
            resource_r5["name"] = settings.name
        return resource_r5
    resource: FhirResource = {
        "resourceType": "Endpoint",
        "id": settings.id,
        "status": "active",
        "connectionType": {
            "system": CONNECTION_TYPE_SYSTEM,
            "code": settings.connection_type,
            "display": display,
        },
        "payloadType": [{"text": payload_text}],
        "payloadMimeType": list(mime_types),
        "address": normalized_address(settings.address),
    }
    if settings.name:
        resource["name"] = settings.name
    return resource
