"""PURE: merge our ImagingStudy into the version someone else changed on the server (after a 412).

pacs-bridge owns the elements in ``OWNED_ELEMENTS``: ours replace the server's, and one we no longer produce
is removed. Everything else the server holds (``encounter``, ``note``, ``text``, extensions, …) is kept.
``basedOn`` is shared: ours (the accession number, with the ServiceRequest's literal reference when
``accession.mode`` lookup found it) replace our own, and the server's literal references
(``{"reference": "ServiceRequest/…"}``) are kept after them, except one that repeats a reference of ours or that
is an entry of ours from an earlier write (``_is_our_order``: typed ServiceRequest, with an ACSN identifier); in
``meta`` ours (``profile``) replaces theirs key by key and their ``tag``/``security`` stay; in ``extension`` the
URLs in ``OWNED_EXTENSIONS`` are ours (R5's reading physicians), every other extension theirs. See
docs/reliability.md.
"""

from __future__ import annotations

from typing import Any

from pacs_bridge.fhir.accession import ACCESSION_TYPE_CODE, IDENTIFIER_TYPE_SYSTEM
from pacs_bridge.fhir.imaging_study import INTERPRETER_EXTENSION
from pacs_bridge.fhir.resource import FhirResource

# Every element the R4 and R5 mappings may write, besides resourceType and id.
OWNED_ELEMENTS = frozenset(
    {
        "identifier",
        "status",
        "modality",
        "subject",
        "started",
        "referrer",
        "interpreter",
        "endpoint",
        "numberOfSeries",
        "numberOfInstances",
        "procedureCode",  # R4
        "procedure",  # R5
        "location",
        "reasonCode",  # R4
        "reason",  # R5
        "description",
        "series",
    }
)
_SERVER_META = frozenset({"versionId", "lastUpdated"})
# Extension URLs the mappings may write on the ImagingStudy: ours replace (or, when we write none, remove) theirs.
OWNED_EXTENSIONS = frozenset({INTERPRETER_EXTENSION})


def merge_imaging_study(ours: FhirResource, theirs: FhirResource) -> FhirResource:
    """The resource to write over ``theirs``: our elements, plus what others added that we do not own."""
    merged: dict[str, Any] = {
        key: value
        for key, value in theirs.items()
        if key not in OWNED_ELEMENTS and key not in ("resourceType", "id", "meta", "basedOn", "extension")
    }
    merged.update(ours)
    extensions = list(ours.get("extension") or [])
    extensions += [
        extension
        for extension in theirs.get("extension") or []
        if isinstance(extension, dict) and extension.get("url") not in OWNED_EXTENSIONS
    ]
    merged.pop("extension", None)
    if extensions:
        merged["extension"] = extensions
    # meta is shared key by key: ours (the profile claimed, fhir.profile) wins, their tags and security stay.
    meta = {key: value for key, value in (theirs.get("meta") or {}).items() if key not in _SERVER_META}
    meta.update(ours.get("meta") or {})
    if meta:
        merged["meta"] = meta
    based_on = list(ours.get("basedOn") or [])
    our_references = {entry.get("reference") for entry in based_on if isinstance(entry, dict)}
    based_on += [
        entry
        for entry in theirs.get("basedOn") or []
        if isinstance(entry, dict)
        and "reference" in entry
        and entry["reference"] not in our_references
        and not _is_our_order(entry)
    ]
    if based_on:
        merged["basedOn"] = based_on
    return merged


def _is_our_order(entry: dict[str, Any]) -> bool:
    """A basedOn entry the bridge wrote: ``{reference, type: ServiceRequest, identifier: {type: ACSN, …}}``. One
    left from an earlier write of ours (the accession number corrected since) is replaced, not kept as theirs."""
    identifier = entry.get("identifier")
    if entry.get("type") != "ServiceRequest" or not isinstance(identifier, dict):
        return False
    codings = (identifier.get("type") or {}).get("coding") or []
    return any(
        isinstance(coding, dict)
        and coding.get("system") == IDENTIFIER_TYPE_SYSTEM
        and coding.get("code") == ACCESSION_TYPE_CODE
        for coding in codings
    )
