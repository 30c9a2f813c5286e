"""The relink pass: look again for the Patient and ServiceRequest of studies published by identifier only.

A study published with ``subject`` by identifier only (``patient.mode`` lookup or create, when no single
Patient matched) or ``basedOn`` by identifier only (``accession.mode`` lookup) has a waiting link in the index
(``study_links``). Each pass claims at most ``batch_size`` published studies whose lookup is due (``FOR UPDATE
SKIP LOCKED`` and a lease, so bridges sharing a PostgreSQL database share the work) and searches each waiting
link again, by the identifier the study has now under the configuration in force: an identifier without a system
is never searched (``fhir/identifier.py``), and a Patient is never created here. Exactly one match: the link is
recorded and the study made due, so the publisher sends it through its normal path (the content hash and the
"no useless versions" rule hold; a literal reference found is never downgraded afterwards, ``publish/linking.py``).
Nothing new: looked up again after a longer delay, at least daily (``relink_delay``).

Only while the server answers: a search that fails as retryable (network, 408, 429, 5xx) ends the pass, gives
the studies not yet looked up back, and pauses relinking for ``pause`` (``publish.probe_seconds``); a refusal
(another 4xx) counts as a lookup that found nothing. ``run_once`` never raises. Logs carry study UIDs, the link
and counts, never the identifier searched.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from pacs_bridge.errors import IndexUnavailableError, PublishError
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.observe import BridgeObserver, NullObserver
from pacs_bridge.publish.index_outage import IndexOutageLog
from pacs_bridge.publish.linking import Lookup, kept_link, links_after_relink
from pacs_bridge.publish.orders import OrderResolver
from pacs_bridge.publish.patients import PatientResolver
from pacs_bridge.records import Link
from pacs_bridge.study_queue import LinkStore, RelinkCandidate

Clock = Callable[[], datetime]

log = structlog.get_logger("pacs_bridge.relink")


class RelinkOutcome(enum.Enum):
    LINKED = "linked"  # a literal reference was found: the study is due for republishing
    WAITING = "waiting"  # nothing new: looked up again later, less often
    SETTLED = "settled"  # nothing left to look for (no longer searchable under the configuration)
    REFUSED = "refused"  # the server refused the search (4xx): counted as a lookup that found nothing
    ERROR = "error"  # our own failure; the lease runs out and the study is looked up again


class Relinker:
    def __init__(
        self,
        *,
        links: LinkStore,
        fhir: FhirClient,
        mapping: MappingSettings,
        interval: timedelta,
        clock: Clock,
        claimer: str,
        batch_size: int = 16,
        lease: timedelta = timedelta(minutes=5),
        pause: timedelta = timedelta(seconds=15),
        observer: BridgeObserver | None = None,
        index_outage: IndexOutageLog | None = None,
    ) -> None:
        """``interval``: ``publish.relink_seconds`` (0: the pass does nothing); ``pause``: how long relinking
        rests after the server failed to answer a search; ``index_outage``: where a pass reports that the index
        cannot be used (``publish/index_outage.py``), shared with the publisher."""
        self._links = links
        self._patients = PatientResolver(fhir, mapping)  # only ever looked up here: create=False
        self._orders = OrderResolver(fhir, mapping)
        self._interval = interval
        self._clock = clock
        self._claimer = claimer
        self._batch_size = batch_size
        self._lease = lease
        self._pause = pause
        self._paused_until: datetime | None = None
        self._observer: BridgeObserver = observer or NullObserver()
        self._index_outage = index_outage or IndexOutageLog(clock=clock)

    @property
    def enabled(self) -> bool:
        return self._interval > timedelta(0)

    def run_once(self) -> dict[str, RelinkOutcome]:
        """Look up one batch of due studies again; returns each claimed study's outcome. Never raises."""
        now = self._clock()
        if not self.enabled or (self._paused_until is not None and now < self._paused_until):
            return {}
        try:
            claimed = self._links.claim_due(now, limit=self._batch_size, lease=self._lease, claimer=self._claimer)
        except IndexUnavailableError as exc:
            self._index_outage.failed("relink_claim", exc)
            return {}
        self._index_outage.succeeded()
        outcomes: dict[str, RelinkOutcome] = {}
        for position, candidate in enumerate(claimed):
            study_uid = candidate.study.study_uid
            try:
                try:
                    outcomes[study_uid] = self._relink(candidate)
                except PublishError as exc:
                    if exc.retryable:  # the server does not answer: stop, and give back what was not looked up
                        self._rest(claimed[position:], exc)
                        break
                    outcomes[study_uid] = self._refused(candidate, exc)
            except IndexUnavailableError as exc:
                log.error("relink_failed", study_uid=study_uid, error=str(exc))
                break  # the claims run out with their lease
            except Exception:  # the pass goes on with the next study; the lease brings this one back
                log.exception("relink_crashed", study_uid=study_uid)
                outcomes[study_uid] = RelinkOutcome.ERROR
        return outcomes

    def _relink(self, candidate: RelinkCandidate) -> RelinkOutcome:
        study, published = candidate.study, candidate.links
        patient, order = published.patient, published.order
        if patient.waiting:
            patient = self._look_up("patient", published.patient, lambda: self._patients.look_up(study, create=False))
        if order.waiting:
            order = self._look_up("order", published.order, lambda: self._orders.look_up(study))
        now = self._clock()
        links, republish = links_after_relink(published, patient, order, now=now, interval=self._interval)
        self._links.record_relink(study.study_uid, links, republish_at=now if republish else None)
        if republish:
            found = [name for name, link in (("patient", patient), ("order", order)) if link.reference]
            log.info("study_relinked", study_uid=study.study_uid, links=found, still_waiting=links.waiting)
            return RelinkOutcome.LINKED
        if links.waiting:
            log.debug(
                "relink_no_match",
                study_uid=study.study_uid,
                attempts=links.relink_attempts,
                next_lookup_at=links.relink_at.isoformat() if links.relink_at else None,
            )
            return RelinkOutcome.WAITING
        return RelinkOutcome.SETTLED

    def _look_up(self, link: str, published: Link, look_up: Callable[[], Lookup]) -> Link:
        """The link after one more lookup, counted by outcome (``PublishError`` passes through, counted too)."""
        try:
            found = look_up()
        except PublishError as exc:
            self._observer.relink_looked_up(link=link, outcome="unavailable" if exc.retryable else "refused")
            raise
        if found.reference is not None:
            outcome = "linked"
        elif found.search is None:
            outcome = "not_searchable"
        else:
            outcome = found.reason
        self._observer.relink_looked_up(link=link, outcome=outcome)
        return kept_link(found, published)

    def _refused(self, candidate: RelinkCandidate, error: PublishError) -> RelinkOutcome:
        """A 4xx to a search will not pass by itself: back off as if nothing was found, and say so."""
        study, published = candidate.study, candidate.links
        links, _ = links_after_relink(
            published, published.patient, published.order, now=self._clock(), interval=self._interval
        )
        self._links.record_relink(study.study_uid, links, republish_at=None)
        log.warning(
            "relink_refused",
            study_uid=study.study_uid,
            http_status=error.http_status,
            attempts=links.relink_attempts,
            hint="the FHIR server refused the search: check that the bridge's client may search Patients and "
            "ServiceRequests by identifier",
        )
        return RelinkOutcome.REFUSED

    def _rest(self, unvisited: list[RelinkCandidate], error: PublishError) -> None:
        self._paused_until = self._clock() + self._pause
        log.warning(
            "relink_paused",
            http_status=error.http_status,
            studies_given_back=len(unvisited),
            retry_in_seconds=self._pause.total_seconds(),
        )
        try:
            self._links.release([candidate.study.study_uid for candidate in unvisited])
        except IndexUnavailableError as exc:
            log.error("relink_release_failed", error=str(exc))  # the claims run out with their lease
