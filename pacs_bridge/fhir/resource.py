"""Helpers shared by the pure FHIR builders: the JSON type at the boundary, ids and content hashes."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

FhirResource = dict[str, Any]

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def fhir_id_for_uid(uid: str) -> str:
    """The FHIR logical id for a DICOM UID: the UID itself, so operators can find it by eye.

    A valid DICOM UID (digits and dots, at most 64 characters) is already a valid FHIR id. Anything else
    (never produced for records that passed extraction) gets a name-based UUID of the UID, still
    deterministic, so a re-send always addresses the same resource.
    """
    if _FHIR_ID.fullmatch(uid) and "." in uid:
        return uid
    return str(uuid.uuid5(uuid.NAMESPACE_OID, uid))


def content_hash(resource: FhirResource) -> str:
    """sha256 of the resource's canonical JSON: equal content, equal hash, whatever the key order."""
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
