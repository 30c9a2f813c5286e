"""Find the one resource of a type that carries an identifier: the search behind ``patient.mode`` lookup and
``accession.mode`` lookup.

``POST {type}/_search`` with ``identifier=system|value`` in the body, so the value stays out of URLs (and so
out of proxy and access logs). At most ``MAX_MATCHES`` are read: two already mean "several", and a server that
keeps paging cannot hold the publisher. Only an id that is a valid FHIR id becomes a reference.
"""

from __future__ import annotations

import re

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.publish.linking import Lookup

MAX_MATCHES = 2
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def find_one(fhir: FhirClient, resource_type: str, search: str) -> Lookup:
    """``{resource_type}/<id>`` when exactly one resource matches ``identifier=search``; otherwise no reference and
    the reason (``no_match``, ``several_matches``, or ``invalid_id`` when the one match has an id no reference
    may carry). Raises ``PublishError`` when the search fails."""
    query = {"identifier": search, "_count": str(MAX_MATCHES)}
    found = fhir.search(resource_type, query, in_body=True, limit=MAX_MATCHES)
    of_type = [resource for resource in found if resource.get("resourceType") == resource_type]
    matches = {repr(resource.get("id")): resource for resource in of_type}
    if len(matches) != 1:
        return Lookup(search=search, reason="several_matches" if matches else "no_match", matches=len(matches))
    resource_id = next(iter(matches.values())).get("id")
    if not isinstance(resource_id, str) or not _FHIR_ID.fullmatch(resource_id):
        return Lookup(search=search, reason="invalid_id", matches=1)  # no reference can carry it: not ours to fix
    return Lookup(search=search, reference=f"{resource_type}/{resource_id}", matches=1)
