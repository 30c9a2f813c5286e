"""Find the ServiceRequest a study fulfils (``accession.mode: lookup``), for a literal reference in ``basedOn``.

``reference`` answers ``ServiceRequest/<id>`` when exactly one ServiceRequest carries the study's accession
identifier (``POST ServiceRequest/_search`` with ``identifier=system|value``, ``publish/lookup.py``), or ``None``
for the reference by identifier alone that ``identifier`` mode always sends. Nothing is ever created: the order
is the RIS's or the EHR's.

An accession number without a system is never searched: the same number may be another issuer's order. That is
a study whose Issuer of Accession Number names an issuer ``accession.issuers`` does not list
(``accession.identifier_system`` serves only studies that name no issuer), or any study when no system is
configured (``fhir/accession.py``). Each fallback is logged as ``order_lookup_fallback`` with the study UID, the
reason and the number of matches (or the unmapped issuer); search failures raise ``PublishError`` like any
publish request.
"""

from __future__ import annotations

import structlog

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.identifier import identifier_search
from pacs_bridge.fhir.imaging_study import MappingSettings, study_accession_identifier
from pacs_bridge.publish.linking import Lookup
from pacs_bridge.publish.lookup import find_one
from pacs_bridge.records import StudyAttributes

log = structlog.get_logger("pacs_bridge.publish")


class OrderResolver:
    """Resolves basedOn's ServiceRequest for ``mapping.accession_mode``; sends nothing in ``identifier`` mode."""

    def __init__(self, fhir: FhirClient, mapping: MappingSettings) -> None:
        self._fhir = fhir
        self._mapping = mapping

    def reference(self, study: StudyAttributes) -> str | None:
        """``ServiceRequest/<id>`` for the study's order; ``None``: basedOn stays a reference by identifier.
        Each fallback to the identifier is logged as ``order_lookup_fallback``."""
        return self.resolve(study).reference

    def resolve(self, study: StudyAttributes) -> Lookup:
        """``look_up``, logging each fallback to the identifier as ``order_lookup_fallback``."""
        found = self.look_up(study)
        if found.reason:
            details: dict[str, object] = {"reason": found.reason}
            if found.issuer:
                details["issuer"] = found.issuer
            if found.matches is not None:
                details["matches"] = found.matches
            log.warning("order_lookup_fallback", study_uid=study.study_uid, **details)
        return found

    def look_up(self, study: StudyAttributes) -> Lookup:
        """What ``reference`` finds, with the search it sent and why it found no reference; logs nothing."""
        if self._mapping.accession_mode != "lookup":
            return Lookup(search=None)
        identifier = study_accession_identifier(study, self._mapping)
        if identifier is None:  # no AccessionNumber: no basedOn, nothing to link
            return Lookup(search=None)
        search = identifier_search(identifier)
        if search is None:
            if "assigner" in identifier:  # named an issuer the configuration does not map: never searched
                return Lookup(search=None, reason="issuer_not_mapped", issuer=str(identifier["assigner"]["display"]))
            return Lookup(search=None, reason="no_identifier_system")
        return find_one(self._fhir, "ServiceRequest", search)
