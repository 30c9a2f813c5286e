"""Validation of each resource before it is sent: the fhir.resources models of its FHIR release (R4B for R4,
the package default for R5) check structure, cardinality and types; a small table adds the required bindings
of the codes the bridge emits, which the models do not check (a ``code`` is any string to them).

This module owns the fhir.resources library, as ``fhir/client.py`` owns httpx. A resource that fails is not
sent: ``InvalidResourceError`` is a non-retryable ``PublishError``, so the publisher marks the study failed
with the reason, like a refusal by the server, but without a request.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.endpoint import (
    DICOM_CODE_SYSTEM,
    IHE_IMR_CONNECTION_TYPES,
    IHE_IMR_IMAGING_STUDY_ENDPOINT,
    SERIES_PAYLOAD,
    STUDY_PAYLOAD,
)
from pacs_bridge.fhir.imaging_study import IHE_IMR_IMAGING_STUDY
from pacs_bridge.fhir.resource import FhirResource

# The models' package for each FHIR release we send. R4B's ImagingStudy and Endpoint equal R4's.
_MODEL_PACKAGES = {"R4": "fhir.resources.R4B", "R5": "fhir.resources"}

# Required bindings of the codes we emit, per resource type: element -> allowed codes (R4 and R5 agree).
REQUIRED_CODES: dict[str, dict[str, frozenset[str]]] = {
    "ImagingStudy": {"status": frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"})},
    "Endpoint": {"status": frozenset({"active", "suspended", "error", "off", "entered-in-error", "test"})},
    "Patient": {"gender": frozenset({"male", "female", "other", "unknown"})},
}

MAX_PROBLEMS_SHOWN = 5

# FHIR datatypes: strings hold no control characters but tab, CR and LF; a uri holds no whitespace. The
# fhir.resources patterns only anchor at the start, so a character further in passes them; we check both here.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WHITESPACE = re.compile(r"\s")
_URI_KEYS = frozenset({"system"})


class InvalidResourceError(PublishError):
    """pacs-bridge built a resource that is not valid FHIR, so it was not sent.

    The study is marked failed with the problems listed (element path and what is wrong). This points at data
    the mapping cannot represent or at a bug in pacs-bridge: report it with the study UID. The study is tried
    again when it changes, or when the operator retries it.
    """

    def __init__(self, reference: str, fhir_version: str, problems: list[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        super().__init__(f"{reference} is not valid FHIR {fhir_version}, not sent: {shown}{more}", retryable=False)


@functools.cache
def _model(fhir_version: str, resource_type: str) -> Any:
    package = importlib.import_module(_MODEL_PACKAGES[fhir_version])
    return package.get_fhir_model_class(resource_type)


def _path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(resource)"


def _strings(value: Any, location: tuple[int | str, ...] = ()) -> Iterator[tuple[tuple[int | str, ...], str]]:
    """Every string in a JSON value with its location."""
    if isinstance(value, str):
        yield location, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*location, key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from _strings(item, (*location, position))


def _primitive_problems(resource: FhirResource) -> list[str]:
    problems = []
    for location, text in _strings(resource):
        if _CONTROL_CHARACTER.search(text):
            problems.append(f"{_path(location)}: contains a control character, which FHIR strings may not hold")
        elif location and location[-1] in _URI_KEYS and _WHITESPACE.search(text):
            problems.append(f"{_path(location)}: a uri may not contain whitespace, got {text!r}")
    return problems


WADO_RS = "dicom-wado-rs"


def _ihe_imr_problems(resource: FhirResource, endpoint_types: dict[str, str]) -> list[str]:
    """What the IHE IMR ImagingStudy profile (1.1.0) adds to R4, for a resource that claims it.

    identifier:studyUID 1..1 (system urn:dicom:uid), modality 1..*, started 1..1, endpoint 1..* of IMR Imaging
    Study Endpoints (connection type WADO-RS or IID; the Endpoints themselves are checked when they are sent).
    We also require that one referenced Endpoint be DICOM WADO-RS, the service a viewer retrieves images with.
    """
    problems = []
    study_uids = [i for i in resource.get("identifier", []) if i.get("system") == "urn:dicom:uid" and i.get("value")]
    if len(study_uids) != 1:
        problems.append("IHE IMR: identifier:studyUID (system urn:dicom:uid) must occur exactly once")
    if not resource.get("modality"):
        problems.append("IHE IMR: modality is required (1..*); the study has no series")
    if not resource.get("started"):
        problems.append("IHE IMR: started is required (1..1); the study has no valid StudyDate")
    endpoints = [reference.get("reference", "") for reference in resource.get("endpoint", [])]
    if not endpoints:
        problems.append("IHE IMR: endpoint is required (1..*); configure a dicom-wado-rs endpoint")
    elif endpoint_types and not any(
        endpoint_types.get(reference.removeprefix("Endpoint/")) == WADO_RS for reference in endpoints
    ):
        problems.append("IHE IMR: no referenced Endpoint is dicom-wado-rs")
    for reference in endpoints:
        connection_type = endpoint_types.get(reference.removeprefix("Endpoint/"))
        if connection_type is not None and connection_type not in IHE_IMR_CONNECTION_TYPES:
            problems.append(f"IHE IMR: endpoint {reference} is {connection_type}, not an Imaging Study Endpoint")
    return problems


_IMR_PAYLOAD_CODES = frozenset({STUDY_PAYLOAD["code"], SERIES_PAYLOAD["code"]})


def _ihe_imr_endpoint_problems(resource: FhirResource) -> list[str]:
    """What the IHE IMR Imaging Study Endpoint profile (1.1.0) adds to R4: connectionType from {dicom-wado-rs,
    ihe-iid} (required binding), payloadType 1..1 coded from DICOM (113014 Study; 113015 Series)."""
    problems = []
    connection_type = resource.get("connectionType", {}).get("code")
    if connection_type not in IHE_IMR_CONNECTION_TYPES:
        problems.append(
            f"IHE IMR Endpoint: connectionType {connection_type!r} is not one of "
            f"{', '.join(sorted(IHE_IMR_CONNECTION_TYPES))}"
        )
    payload_types = resource.get("payloadType", [])
    codes = [
        coding.get("code")
        for payload_type in payload_types
        for coding in payload_type.get("coding", [])
        if coding.get("system") == DICOM_CODE_SYSTEM
    ]
    if len(payload_types) != 1 or not any(code in _IMR_PAYLOAD_CODES for code in codes):
        problems.append("IHE IMR Endpoint: payloadType must occur once, coded DICOM 113014 Study or 113015 Series")
    return problems


def resource_problems(
    resource: FhirResource, *, fhir_version: str, endpoint_types: dict[str, str] | None = None
) -> list[str]:
    """Every problem found in ``resource`` as ``"element.path: what is wrong"``; empty when it is valid.

    A resource claiming a profile we know (``meta.profile``) is checked against it too; ``endpoint_types``
    (Endpoint id -> connection type) lets the IHE IMR check see what the referenced Endpoints are.
    """
    resource_type = str(resource.get("resourceType", ""))
    if fhir_version not in _MODEL_PACKAGES:
        return [f"unsupported FHIR version {fhir_version!r}; expected R4 or R5"]
    try:
        model = _model(fhir_version, resource_type)
    except (KeyError, ValueError, AttributeError):
        return [f"resourceType: unknown resource type {resource_type!r}"]
    problems = []
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        problems = [f"{_path(tuple(error['loc']))}: {error['msg']}" for error in exc.errors()]
    problems += _primitive_problems(resource)
    profiles = resource.get("meta", {}).get("profile", [])
    if IHE_IMR_IMAGING_STUDY in profiles:
        problems += _ihe_imr_problems(resource, endpoint_types or {})
    if IHE_IMR_IMAGING_STUDY_ENDPOINT in profiles:
        problems += _ihe_imr_endpoint_problems(resource)
    for element, allowed in REQUIRED_CODES.get(resource_type, {}).items():
        value = resource.get(element)
        if value is not None and value not in allowed:
            problems.append(f"{element}: {value!r} is not in the required value set ({', '.join(sorted(allowed))})")
    return problems


def validate_resource(
    resource: FhirResource, *, fhir_version: str, endpoint_types: dict[str, str] | None = None
) -> None:
    """Raise ``InvalidResourceError`` listing the problems when ``resource`` is not valid ``fhir_version`` (or
    not the profile it claims)."""
    problems = resource_problems(resource, fhir_version=fhir_version, endpoint_types=endpoint_types)
    if problems:
        reference = f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"
        raise InvalidResourceError(reference, fhir_version, problems)
