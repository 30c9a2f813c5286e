"""Compare the index with the FHIR server, study by study, and report (or repair) what differs.

For every published study the server is searched by the study's identifier (``urn:dicom:uid``):
- **missing**: no ImagingStudy at our id (deleted on the server, or never arrived);
- **stale**: ours is there, but an element pacs-bridge owns is not what the index builds now (edited on the
  server); what others added and we do not own (``encounter``, ``note``, see ``fhir/merge.py``) is no
  discrepancy, since the publisher's merge keeps it;
- **duplicate**: other ImagingStudy resources carry the same study identifier.
``fix`` makes missing and stale studies due for republishing (the next tick sends them) and deletes the
duplicates, keeping the resource at our own id.

In ``patient.mode`` lookup or create and ``accession.mode`` lookup the references are resolved as the publisher
would send them; a study whose Patient or ServiceRequest is not found (no match, several, an issuer not mapped)
is compared with its reference by identifier, as published. Those fallbacks are counted in the report by link
and reason, not logged study by study.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import DICOM_UID_SYSTEM, MappingSettings, build_imaging_study, imaging_study_id
from pacs_bridge.fhir.merge import merge_imaging_study
from pacs_bridge.fhir.resource import FhirResource, content_hash
from pacs_bridge.index.models import PublishState
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.linking import Lookup
from pacs_bridge.publish.references import ReferenceResolver

DiscrepancyKind = Literal["missing", "stale", "duplicate"]
# Elements the server owns: never part of the comparison.
SERVER_ELEMENTS = frozenset({"meta", "text"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Discrepancy:
    study_uid: str
    kind: DiscrepancyKind
    detail: str
    fixed: bool = False


@dataclass(slots=True, kw_only=True)
class ReconcileReport:
    checked: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)
    # Studies whose Patient ("patient") or ServiceRequest ("order") lookup found no reference, by (link, reason).
    lookup_fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def unresolved(self) -> list[Discrepancy]:
        return [d for d in self.discrepancies if not d.fixed]


def _without_server_elements(resource: FhirResource) -> FhirResource:
    return {key: value for key, value in resource.items() if key not in SERVER_ELEMENTS}


def reconcile(
    index: Index,
    fhir: FhirClient,
    mapping: MappingSettings,
    *,
    fix: bool,
    clock: Callable[[], datetime],
    limit: int = 1_000_000,
) -> ReconcileReport:
    """Check every published study (at most ``limit``) against the server; repair when ``fix``."""
    report = ReconcileReport()
    references = ReferenceResolver(fhir, mapping, index.links)

    def count_fallback(link: str, found: Lookup) -> None:
        report.lookup_fallbacks[(link, found.reason)] += 1

    for status in index.studies_in_state(PublishState.PUBLISHED, limit=limit):
        study_uid = status.study_uid
        report.checked += 1
        found = fhir.search("ImagingStudy", {"identifier": f"{DICOM_UID_SYSTEM}|urn:oid:{study_uid}"})
        own_id = imaging_study_id(study_uid)
        ours = [resource for resource in found if resource.get("id") == own_id]
        others = [resource for resource in found if resource.get("id") != own_id]
        for other in others:
            if fix:
                fhir.delete("ImagingStudy", str(other["id"]))
            report.discrepancies.append(
                Discrepancy(
                    study_uid=study_uid,
                    kind="duplicate",
                    detail=f"ImagingStudy/{other.get('id')} carries the same study identifier",
                    fixed=fix,
                )
            )
        if not ours:
            problem = Discrepancy(study_uid=study_uid, kind="missing", detail=f"no ImagingStudy/{own_id}", fixed=fix)
        else:
            snapshot = index.load_snapshot(study_uid)
            # lookup / create modes: the Patient and ServiceRequest the server holds now, or the literal references
            # published before (never downgraded), as the publisher would send them; reconcile never creates one
            resolved = references.resolve(snapshot.attributes, create=False, on_fallback=count_fallback)
            expected = build_imaging_study(
                snapshot,
                mapping,
                patient_reference=resolved.patient.reference,
                order_reference=resolved.order.reference,
            )
            # What the publisher would write over the server's resource: the same when only others' elements differ.
            rewritten = merge_imaging_study(expected, ours[0])
            if content_hash(_without_server_elements(ours[0])) == content_hash(_without_server_elements(rewritten)):
                continue
            problem = Discrepancy(
                study_uid=study_uid,
                kind="stale",
                detail=f"ImagingStudy/{own_id} differs from what the index holds",
                fixed=fix,
            )
        if fix:
            index.republish(clock(), study_uid=study_uid)
        report.discrepancies.append(problem)
    return report
