"""The literal references a study's ImagingStudy carries, for one publish: looked up, never downgraded, recorded.

``resolve`` asks ``PatientResolver`` (``patient.mode``) and ``OrderResolver`` (``accession.mode``) and holds
what they find against the links the index recorded at the study's last publish (``publish/linking.py``,
``kept_link``): a literal reference published for the same identifier is kept when the server finds nothing
now. ``record`` stores the links sent, with the relink schedule of those still waiting for their target.
Reconcile resolves the same way, without creating a Patient and without recording.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.publish.linking import Lookup, kept_link, links_after_publish
from pacs_bridge.publish.orders import OrderResolver
from pacs_bridge.publish.patients import PatientResolver
from pacs_bridge.records import Link, StudyAttributes, StudyLinks
from pacs_bridge.study_queue import LinkStore

log = structlog.get_logger("pacs_bridge.publish")

# publish.relink_seconds' default: how long after a publish a study still waiting for its Patient or
# ServiceRequest is looked up again (config/publishing.py documents it).
DEFAULT_RELINK_INTERVAL = timedelta(seconds=900)

# Told of each lookup that found no reference, in place of its log line: ("patient" or "order", the lookup).
FallbackSink = Callable[[str, Lookup], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyReferences:
    """What one publish of a study sends in subject and basedOn, and what the index held before it."""

    patient: Link
    order: Link
    published: StudyLinks | None  # the links recorded at the last publish; None: none recorded


class ReferenceResolver:
    """Resolves and records the subject's Patient and basedOn's ServiceRequest of the studies published."""

    def __init__(
        self,
        fhir: FhirClient,
        mapping: MappingSettings,
        links: LinkStore,
        *,
        relink_interval: timedelta = DEFAULT_RELINK_INTERVAL,
        validate: Callable[[FhirResource], None] | None = None,
        exclusive: Callable[[str], AbstractContextManager[None]] | None = None,
    ) -> None:
        """``relink_interval``: ``publish.relink_seconds``, when a waiting link is first looked up again;
        ``validate`` and ``exclusive`` are ``PatientResolver``'s (the Patient ``create`` mode sends)."""
        self._patients = PatientResolver(fhir, mapping, validate=validate, exclusive=exclusive)
        self._orders = OrderResolver(fhir, mapping)
        self._links = links
        self._relink_interval = relink_interval
        # Both modes identifier (the defaults): nothing is looked up or linked, and the index is not asked.
        self._links_nothing = mapping.patient_mode == "identifier" and mapping.accession_mode == "identifier"

    def resolve(
        self, study: StudyAttributes, *, create: bool = True, on_fallback: FallbackSink | None = None
    ) -> StudyReferences:
        """The references to send for ``study`` now. Raises ``PublishError`` when a request fails, and
        ``IndexUnavailableError`` when the recorded links cannot be read. ``create=False``: the Patient is only
        looked up, never created (reconcile). Each lookup that falls back to the identifier is logged
        (``patient_lookup_fallback``, ``order_lookup_fallback``), or, with ``on_fallback``, handed to it as
        (``"patient"`` or ``"order"``, the lookup) instead, for a caller that reports them together."""
        if self._links_nothing:
            return StudyReferences(patient=Link(), order=Link(), published=None)
        published = self._links.load(study.study_uid)
        if on_fallback is None:
            patient_found = self._patients.resolve(study, create=create)
            order_found = self._orders.resolve(study)
        else:
            patient_found = self._patients.look_up(study, create=create)
            order_found = self._orders.look_up(study)
            for link, found in (("patient", patient_found), ("order", order_found)):
                if found.reason:
                    on_fallback(link, found)
        patient = self._kept("patient", study, patient_found, published.patient if published else None)
        order = self._kept("order", study, order_found, published.order if published else None)
        return StudyReferences(patient=patient, order=order, published=published)

    @staticmethod
    def _kept(link: str, study: StudyAttributes, found: Lookup, published: Link | None) -> Link:
        kept = kept_link(found, published)
        if kept.reference is not None and found.reference is None:  # not the reference: a server's id may be an MRN
            log.info(
                "reference_kept",
                study_uid=study.study_uid,
                link=link,
                reason=found.reason,
                hint="a literal reference is never downgraded; the lookup found none now",
            )
        return kept

    def record(self, study_uid: str, references: StudyReferences, *, now: datetime) -> None:
        """Store the links a publish sent (``references``) and when the waiting ones are looked up again; nothing
        when there is nothing to store (identifier modes, or no searchable identifier, and nothing stored before)."""
        if references.published is None and references.patient == Link() and references.order == Link():
            return
        links = links_after_publish(
            references.published, references.patient, references.order, now=now, interval=self._relink_interval
        )
        self._links.record(study_uid, links)
