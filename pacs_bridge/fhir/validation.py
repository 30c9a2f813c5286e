"""Validation of each resource before it is sent: the fhir.resources models of its FHIR release (R4B for R4,
the package default for R5) check structure, cardinality and types; a small table adds the required bindings
of the codes the bridge emits, which the models do not check (a ``code`` is any string to them).

This module owns the fhir.resources library, as ``fhir/client.py`` owns httpx. A resource that fails is not
sent: ``InvalidResourceError`` is a non-retryable ``PublishError``, so the publisher marks the study failed
with the reason, like a refusal by the server, but without a request.

An ImagingStudy's ``series.instance`` entries are most of its size (a CT has thousands) and nearly all of the
models' time (50 ms for 2000 entries, more than the server takes to store them). An entry of the exact shape
the mapping builds, with values well inside what FHIR allows, is accepted by ``_plainly_valid_instance``
without the models; any other entry is validated by the instance model, at its own path. The rest of the
resource always goes through the models. A property test checks that an entry accepted here is one the
models accept.
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


def load_models(fhir_version: str) -> None:
    """Import the models of every resource type the bridge sends now, not at the first study (the wiring does
    it before it freezes what lives as long as the process: see ``service.BridgeService.start``)."""
    for resource_type in REQUIRED_CODES:
        _model(fhir_version, resource_type)
    _instance_model(fhir_version)


@functools.cache
def _instance_model(fhir_version: str) -> Any:
    """The model of one ``ImagingStudy.series.instance`` entry."""
    return importlib.import_module(f"{_MODEL_PACKAGES[fhir_version]}.imagingstudy").ImagingStudySeriesInstance


# What _plainly_valid_instance accepts, each narrower than the FHIR datatype: an id; a uri or code of visible
# ASCII characters; a string of one or more characters, no control character, no whitespace at either end.
_INSTANCE_KEYS = frozenset({"uid", "sopClass", "number", "title"})
_SOP_CLASS_KEYS = frozenset({"system", "code", "display"})
_PLAIN_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PLAIN_TOKEN = re.compile(r"[!-~]{1,4096}")
_PLAIN_TEXT = re.compile(r"[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,4094}[^\s\x00-\x1f\x7f])?")
_MAX_UNSIGNED_INT = 2_147_483_647
_PLAIN_CODINGS_KEPT = 8


def _plainly_valid_instance(entry: Any, plain_codings: list[Any] | None = None) -> bool:
    """Whether ``entry`` is an instance entry of the mapping's shape whose values are valid in R4 and R5.

    False says only "not plainly": the entry then goes to the instance model, which reports what is wrong.
    ``plain_codings``: sopClass values found plain already (a study's entries share one or two); one equal to
    them is not checked again, and a new plain one is added.
    """
    if type(entry) is not dict or not entry.keys() <= _INSTANCE_KEYS:
        return False
    uid, sop_class = entry.get("uid"), entry.get("sopClass")
    if type(uid) is not str or not _PLAIN_ID.fullmatch(uid):
        return False
    if type(sop_class) is not dict:
        return False
    if plain_codings is None or sop_class not in plain_codings:
        if not _plainly_valid_coding(sop_class):
            return False
        if plain_codings is not None and len(plain_codings) < _PLAIN_CODINGS_KEPT:
            plain_codings.append(sop_class)
    if "number" in entry:
        number = entry["number"]
        if type(number) is not int or not 0 <= number <= _MAX_UNSIGNED_INT:
            return False
    if "title" in entry:
        title = entry["title"]
        if type(title) is not str or not _PLAIN_TEXT.fullmatch(title):
            return False
    return True


def _plainly_valid_coding(coding: dict[Any, Any]) -> bool:
    if not coding or not coding.keys() <= _SOP_CLASS_KEYS:
        return False
    for key, value in coding.items():
        pattern = _PLAIN_TEXT if key == "display" else _PLAIN_TOKEN
        if type(value) is not str or not pattern.fullmatch(value):
            return False
    return True


def _without_plain_instances(resource: FhirResource) -> tuple[FhirResource, list[tuple[tuple[int | str, ...], Any]]]:
    """The resource with each series' plainly valid instance entries left out, and the other entries with
    their paths. A series whose entries all are plain loses its ``instance`` element (0..*); an empty list stays,
    for the models to refuse."""
    series = resource.get("series")
    if resource.get("resourceType") != "ImagingStudy" or type(series) is not list:
        return resource, []
    others: list[tuple[tuple[int | str, ...], Any]] = []
    trimmed_series: list[Any] = []
    plain_codings: list[Any] = []
    for series_position, element in enumerate(series):
        entries = element.get("instance") if type(element) is dict else None
        if type(entries) is not list or not entries:
            trimmed_series.append(element)
            continue
        for position, entry in enumerate(entries):
            if not _plainly_valid_instance(entry, plain_codings):
                others.append((("series", series_position, "instance", position), entry))
        trimmed_series.append({key: value for key, value in element.items() if key != "instance"})
    return {**resource, "series": trimmed_series}, others


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


def _model_problems(model: Any, value: Any, location: tuple[int | str, ...] = ()) -> list[str]:
    """What ``model`` finds wrong in ``value`` (found at ``location`` in the resource)."""
    try:
        model.model_validate(value)
    except ValidationError as exc:
        return [f"{_path((*location, *error['loc']))}: {error['msg']}" for error in exc.errors()]
    return []


def _primitive_problems(resource: Any, at: tuple[int | str, ...] = ()) -> list[str]:
    problems = []
    for location, text in _strings(resource, at):
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
    trimmed, instances = _without_plain_instances(resource)
    problems = _model_problems(model, trimmed)
    problems += _primitive_problems(trimmed)
    for location, entry in instances:
        problems += _model_problems(_instance_model(fhir_version), entry, location)
        problems += _primitive_problems(entry, location)
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
