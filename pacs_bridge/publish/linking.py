"""PURE: how a study's subject and basedOn reach the Patient and the ServiceRequest the FHIR server holds, and
when a study sent with a reference by identifier only is looked up again.

A ``Lookup`` is what one search by identifier found (``publish/lookup.py`` sends it): the literal reference of
exactly one match, or why there is none. A ``Link`` (``records.py``) is what was published: the digest of the
identifier searched, and the literal reference sent, if any.

- **Never downgraded** (``kept_link``): once a study was published with a literal reference, a later lookup of
  the same identifier that finds nothing (the server's search lagging, two Patients until they are merged)
  keeps it. A different identifier (a corrected PatientID or accession number) is another link: the old
  reference is not kept for it. An identifier that is no longer searchable (its issuer no longer mapped) is
  never linked, whatever was sent before.
- **Relink timing** (``relink_delay``): a study published with a searchable identifier but no literal reference
  is looked up again ``publish.relink_seconds`` later, then after twice as long each time nothing new is found,
  at most a day apart: bounded work for a study whose Patient never appears, and still a daily chance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from pacs_bridge.records import Link, StudyLinks

# The longest time between two lookups of a study that keeps not matching: at least daily.
MAX_RELINK_DELAY = timedelta(days=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """The outcome of looking up a study's Patient or ServiceRequest by its identifier."""

    # The ``system|value`` token searched; None: the identifier was not searched (the mode asks for no search,
    # or the identifier has no system, or there is no identifier).
    search: str | None
    reference: str | None = None  # "Patient/123": exactly one resource matched (or was created)
    # Why there is no reference ("" when there is one, or when the mode asks for none): no_match,
    # several_matches, invalid_id, issuer_not_mapped, no_identifier_system, no_patient_id.
    reason: str = ""
    matches: int | None = None  # how many resources the search found; None when not searched or not known
    issuer: str = ""  # the issuer the configuration does not map (reason issuer_not_mapped)


def search_key(search: str | None) -> str | None:
    """The digest the index keeps of an identifier search (``system|value``): equal searches, equal keys; the
    identifier itself is not stored a second time."""
    return None if search is None else hashlib.sha256(search.encode("utf-8")).hexdigest()


def kept_link(found: Lookup, published: Link | None) -> Link:
    """The link to send after ``found``, given the one ``published`` before (None: never published).

    A literal reference found is sent. None found, for the identifier a literal reference was published with:
    that reference is kept (never downgraded). Otherwise the reference is by identifier only, and a searchable
    identifier waits for the relink pass.
    """
    key = search_key(found.search)
    if key is None:
        return Link()
    if found.reference is not None:
        return Link(key=key, reference=found.reference)
    if published is not None and published.key == key and published.reference is not None:
        return published
    return Link(key=key)


def relink_delay(attempts: int, interval: timedelta) -> timedelta:
    """How long until the next lookup of a study whose last ``attempts`` lookups in a row found nothing new:
    ``interval`` (``publish.relink_seconds``), doubled with each such lookup, at most a day (or ``interval``
    itself, were it longer)."""
    longest = max(interval, MAX_RELINK_DELAY)
    seconds = interval.total_seconds() * 2.0 ** min(attempts, 64)  # in float: never a timedelta overflow
    return timedelta(seconds=min(seconds, longest.total_seconds()))


def _waiting_keys(patient: Link, order: Link) -> tuple[str | None, str | None]:
    return (patient.key if patient.waiting else None, order.key if order.waiting else None)


def links_after_publish(
    published: StudyLinks | None, patient: Link, order: Link, *, now: datetime, interval: timedelta
) -> StudyLinks:
    """The links to record once a study was published with ``patient`` and ``order``.

    A link still waiting for its target is looked up ``interval`` later; when the same identifiers were
    already waiting, their schedule and backoff go on (a study that keeps changing does not restart them). With
    relinking off (``interval`` 0) they wait from now, for when it is turned on.
    """
    if not (patient.waiting or order.waiting):
        return StudyLinks(patient=patient, order=order)
    if (
        published is not None
        and published.relink_at is not None
        and _waiting_keys(published.patient, published.order) == _waiting_keys(patient, order)
    ):
        return StudyLinks(
            patient=patient, order=order, relink_at=published.relink_at, relink_attempts=published.relink_attempts
        )
    first = now + relink_delay(0, interval) if interval > timedelta(0) else now
    return StudyLinks(patient=patient, order=order, relink_at=first)


def links_after_relink(
    published: StudyLinks, patient: Link, order: Link, *, now: datetime, interval: timedelta
) -> tuple[StudyLinks, bool]:
    """The links to record after a relink pass looked the waiting ones up, and whether the study must be
    republished (a literal reference was found that the published resource lacks).

    Found: republished; whatever still waits is looked up ``interval`` later, its backoff restarted. Nothing
    found: looked up again after ``relink_delay`` of one more attempt. Nothing left to look for (the identifier
    is no longer searchable): no schedule.
    """
    linked = any(
        found.reference is not None and found != before
        for found, before in ((patient, published.patient), (order, published.order))
    )
    waiting = patient.waiting or order.waiting
    if linked:
        relink_at = now + relink_delay(0, interval) if waiting else None
        return StudyLinks(patient=patient, order=order, relink_at=relink_at), True
    if not waiting:
        return StudyLinks(patient=patient, order=order), False
    attempts = published.relink_attempts + 1
    relink_at = now + relink_delay(attempts, interval)
    return StudyLinks(patient=patient, order=order, relink_at=relink_at, relink_attempts=attempts), False
