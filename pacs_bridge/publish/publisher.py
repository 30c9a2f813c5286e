"""Publishing passes: claim due studies in batches, publish them ``concurrency`` at a time, record each batch.

A pass claims up to ``batch_size`` due studies in one transaction and hands them to a pool of ``concurrency``
workers; each worker runs ``publish`` for one study (load its snapshot, find the subject's Patient, build and
hash the ImagingStudy, send nothing when it is unchanged, else validate and PUT it). The batch's results are
written in one transaction (``Index.record_publish_results``). Two batches are in flight at once, so the
workers never wait for a claim or a record, and the pass goes on claiming while studies are due: the FHIR
server, not the bridge, sets the pace.

The FHIR server's availability is tracked by ``publish/outage.py``: an outage is logged when it starts, as a
summary while it lasts and when it ends, not once per study and attempt. During an outage a pass tries at most
``concurrency`` studies (the rest stay due), the server is probed every ``probe_interval``, and when it answers
every study waiting out a backoff is released at once: due now, or when its ``Retry-After`` ends, never at the
end of its exponential backoff (a ``Retry-After`` is a floor, not a schedule). An outage may end by a
publishing request answered before any probe; the same release follows.

One study's failure never stops the pass, and ``run_once`` itself never raises. The index, the FHIR client and
the mapping settings come in through the constructor; this module owns only the sequence (what one study
came to, and its log line: ``publish/results.py``).
"""

from __future__ import annotations

import functools
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta

import structlog

from pacs_bridge.debounce import RetrySettings, retry_delay
from pacs_bridge.errors import IndexUnavailableError, PublishError
from pacs_bridge.fhir.client import FhirClient, PutResult
from pacs_bridge.fhir.endpoint import build_endpoint
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study, unmapped_issuers
from pacs_bridge.fhir.merge import merge_imaging_study
from pacs_bridge.fhir.resource import FhirResource, content_hash
from pacs_bridge.fhir.validation import validate_resource
from pacs_bridge.observe import BridgeObserver, NullObserver
from pacs_bridge.publish.index_outage import IndexOutageLog
from pacs_bridge.publish.outage import OutageEnded, OutageStarted, OutageTracker, is_outage
from pacs_bridge.publish.references import DEFAULT_RELINK_INTERVAL, ReferenceResolver
from pacs_bridge.publish.results import PublishOutcome, StudyResult, report_result
from pacs_bridge.records import StudyAttributes, StudySnapshot
from pacs_bridge.study_queue import ClaimedStudy, Published, PublishQueue, Refused, Released, RetryLater

Clock = Callable[[], datetime]

log = structlog.get_logger("pacs_bridge.publish")

# Read, merge and write at most this often per attempt when others keep changing the resource meanwhile.
MAX_MERGE_ROUNDS = 3
# Batches claimed ahead: while the workers publish one, the next waits in their queue.
BATCHES_IN_FLIGHT = 2


class Publisher:
    def __init__(
        self,
        *,
        index: PublishQueue,
        fhir: FhirClient,
        mapping: MappingSettings,
        retry: RetrySettings,
        clock: Clock,
        claimer: str,
        batch_size: int = 64,
        concurrency: int = 4,
        lease: timedelta = timedelta(minutes=5),
        random_fraction: Callable[[], float] = random.random,
        observer: BridgeObserver | None = None,
        max_attempts: int = 0,
        validate: Callable[[FhirResource], None] | None = None,
        probe_interval: timedelta = timedelta(seconds=1),
        on_progress: Callable[[], None] | None = None,
        relink_interval: timedelta = DEFAULT_RELINK_INTERVAL,
        index_outage: IndexOutageLog | None = None,
    ) -> None:
        """``batch_size``: studies claimed (and recorded) per transaction; ``concurrency``: studies published at
        once, each over its own kept-alive connection. ``max_attempts``: after this many failed attempts in a row
        a retryable failure marks the study failed too; 0 retries without limit. ``validate`` raises
        ``PublishError`` for a resource that must not be sent; by default each resource is validated against the
        FHIR models of ``mapping.fhir_version``. ``probe_interval``: how often the server is asked (GET metadata)
        during an outage. ``on_progress`` is called after each recorded batch (a heartbeat for long passes).
        ``relink_interval``: ``publish.relink_seconds``, when a study published without the literal reference of its
        Patient or ServiceRequest is first looked up again (``publish/relink.py``). ``index_outage``: where a
        pass reports that the index cannot be used (``publish/index_outage.py``), shared with the relinker."""
        self._validate = validate or functools.partial(
            validate_resource,
            fhir_version=mapping.fhir_version,
            endpoint_types={endpoint.id: endpoint.connection_type for endpoint in mapping.endpoints},
        )
        self._index = index
        self._fhir = fhir
        self._mapping = mapping
        self._retry = retry
        self._clock = clock
        self._claimer = claimer
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._lease = lease
        self._random_fraction = random_fraction
        self._max_attempts = max_attempts
        self._observer: BridgeObserver = observer or NullObserver()
        self._on_progress = on_progress or (lambda: None)
        self._endpoints = {
            settings.id: build_endpoint(settings, fhir_version=mapping.fhir_version, profile=mapping.profile)
            for settings in mapping.endpoints
        }
        self._endpoints_confirmed: dict[str, str] = {}
        self._endpoints_lock = threading.Lock()
        self._references = ReferenceResolver(
            fhir,
            mapping,
            index.links,
            relink_interval=relink_interval,
            validate=self._validate,
            exclusive=index.exclusive,
        )
        self._index_outage = index_outage or IndexOutageLog(clock=clock)
        self._probe_interval = probe_interval
        self._outage = OutageTracker(probe_interval=probe_interval)
        self._outage_lock = threading.Lock()
        self._released_by_probe = 0  # studies a probe released during the outage, for its end's log line
        self._pass_stops = threading.Event()  # an outage began: start no more studies in this pass
        self._stopping = threading.Event()

    # ---- passes ---------------------------------------------------------------------------------------------

    def run_once(self) -> dict[str, PublishOutcome]:
        """Publish every study due now; returns each claimed study's outcome. Never raises."""
        try:
            self._probe_if_due()
            outcomes = self._publish_due()
            self._summarize_outage()
            return outcomes
        finally:
            self._observer.publish_pass_completed()

    def check_server(self) -> None:
        """Ask the FHIR server whether it answers (GET metadata), once, at start: an outage found here is
        logged with its cause; an answer releases the studies a backoff from before the start holds."""
        self._probe(at_start=True)

    def request_stop(self) -> None:
        """Make a running pass end soon: no more claims; claimed studies not yet started are given back."""
        self._stopping.set()

    def seconds_until_next_due(self) -> float | None:
        """How long until the earliest waiting study falls due (0 if one is due now); None when none waits or
        the index cannot say. Lets the caller run the next pass on time rather than at its next tick."""
        try:
            next_due = self._index.next_due_at()
        except IndexUnavailableError:
            return None
        return None if next_due is None else max(0.0, (next_due - self._clock()).total_seconds())

    def seconds_until_next_probe(self) -> float | None:
        """How long until the FHIR server is to be asked again during an outage; None when no probe is planned."""
        with self._outage_lock:
            probe_at = self._outage.next_probe_at()
        return None if probe_at is None else max(0.0, (probe_at - self._clock()).total_seconds())

    def fhir_server_problem(self) -> str | None:
        """None while the FHIR server answers, else since when and why it does not (for /readyz's body)."""
        with self._outage_lock:
            since, cause = self._outage.since, self._outage.cause
        if since is None:
            return None
        return f"no answer since {since.isoformat(timespec='seconds')}: {cause}"

    def _publish_due(self) -> dict[str, PublishOutcome]:
        """Claim and publish batches while studies are due, ``BATCHES_IN_FLIGHT`` batches ahead. During an
        outage one batch of ``concurrency`` studies at a time; once an outage begins, nothing more."""
        outcomes: dict[str, PublishOutcome] = {}
        seen: set[str] = set()
        in_flight: deque[list[Future[StudyResult]]] = deque()
        claiming = True
        self._pass_stops.clear()
        with ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="pacs-bridge-publish") as pool:
            while True:
                while claiming and len(in_flight) < (1 if self._outage.in_outage else BATCHES_IN_FLIGHT):
                    if self._stopping.is_set() or self._pass_stops.is_set():
                        claiming = False
                        break
                    limit = self._concurrency if self._outage.in_outage else self._batch_size
                    claimed = self._claim(limit)
                    fresh = [study for study in claimed if study.study_uid not in seen]
                    seen.update(study.study_uid for study in fresh)
                    if len(fresh) < len(claimed):  # released earlier in this pass and claimed again: not now
                        self._release([study.study_uid for study in claimed if study not in fresh])
                    snapshots = self._load_snapshots(fresh)
                    if snapshots is None:  # the index failed since the claim: give the batch back, claim no more
                        self._release([study.study_uid for study in fresh])
                        claiming = False
                        break
                    if fresh:
                        in_flight.append(
                            [pool.submit(self._attempt, study, snapshots.get(study.study_uid)) for study in fresh]
                        )
                    # A short batch means nothing more is due now.
                    claiming = len(claimed) == limit and len(fresh) == len(claimed)
                if not in_flight:
                    return outcomes
                results = [future.result() for future in in_flight.popleft()]
                if not self._record(results, outcomes):
                    claiming = False

    def _claim(self, limit: int) -> list[ClaimedStudy]:
        try:
            now = self._clock()
            claimed = self._index.claim_due_studies(now, limit=limit, lease=self._lease, claimer=self._claimer)
        except IndexUnavailableError as exc:
            self._index_outage.failed("claim", exc)
            return []
        self._index_outage.succeeded()
        return claimed

    def _load_snapshots(self, claimed: Sequence[ClaimedStudy]) -> dict[str, StudySnapshot] | None:
        """The batch's snapshots, read in one transaction (a study left out, e.g. a large one, is read by its
        worker); None when the index cannot be read."""
        if not claimed:
            return {}
        try:
            return self._index.load_snapshots([study.study_uid for study in claimed])
        except IndexUnavailableError as exc:
            self._index_outage.failed("load_snapshots", exc)
            return None
        except Exception:  # one study's bad row must not stop the pass: each worker reads its own study instead
            log.exception("batch_snapshots_failed", studies=len(claimed))
            return {}

    def _release(self, study_uids: Sequence[str]) -> None:
        try:
            self._index.record_publish_results([Released(study_uid=study_uid) for study_uid in study_uids])
        except IndexUnavailableError as exc:
            log.error("release_failed", studies=len(study_uids), error=str(exc))

    def _record(self, results: Sequence[StudyResult], outcomes: dict[str, PublishOutcome]) -> bool:
        """Write a batch's results in one transaction, then log them; False when the index cannot be written
        (the claims then run out and the studies are published again: an identical PUT writes no version)."""
        try:
            self._index.record_publish_results([result.record for result in results])
        except IndexUnavailableError as exc:
            log.error("publish_results_not_recorded", studies=len(results), error=str(exc))
            outcomes.update((result.claimed.study_uid, PublishOutcome.ERROR) for result in results)
            return False
        for result in results:
            outcomes[result.claimed.study_uid] = result.outcome
            self._record_references(result)
            report_result(result, self._observer, self._clock)
        self._on_progress()
        return True

    def _record_references(self, result: StudyResult) -> None:
        """Store the links a recorded publish sent (nothing in identifier modes); a failure leaves the links
        as they were, and the relink pass or the next publish sets them right."""
        if result.references is None:
            return
        try:
            self._references.record(result.claimed.study_uid, result.references, now=self._clock())
        except IndexUnavailableError as exc:
            log.error("links_not_recorded", study_uid=result.claimed.study_uid, error=str(exc))

    # ---- one study ------------------------------------------------------------------------------------------

    def _attempt(self, claimed: ClaimedStudy, snapshot: StudySnapshot | None) -> StudyResult:
        """On a worker: publish one claimed study, unless it must not start now."""
        if self._stopping.is_set() or self._pass_stops.is_set() or not self._lease_allows_start(claimed):
            return self._deferred(claimed)
        try:
            result = self.publish(claimed, snapshot)
        except Exception:  # the pass goes on with the next study; this one is released and tried again
            log.exception("publish_crashed", study_uid=claimed.study_uid)
            return StudyResult(
                claimed=claimed, outcome=PublishOutcome.ERROR, record=Released(study_uid=claimed.study_uid)
            )
        self._note_server(result)
        return result

    def _lease_allows_start(self, claimed: ClaimedStudy) -> bool:
        """Start a study only while at least half of its lease is left, so it ends before another bridge may
        claim it (a study waits in the queue behind its batch and the one before)."""
        return claimed.claimed_until is None or self._clock() < claimed.claimed_until - self._lease / 2

    def publish(self, claimed: ClaimedStudy, snapshot: StudySnapshot | None = None) -> StudyResult:
        """Publish one claimed study: its snapshot (read with its batch, else now), resolve the subject's Patient
        and basedOn's ServiceRequest, build and hash the ImagingStudy; the same hash as last published sends
        nothing; else validate it and PUT it (the Endpoints first, once). Returns what the pass records for it
        (``Index.record_publish_results``, then the references sent) and logs."""
        study_uid = claimed.study_uid
        if snapshot is None:
            snapshot = self._index.load_snapshot(study_uid)
        try:  # no request in identifier modes
            references = self._references.resolve(snapshot.attributes)
        except PublishError as exc:
            return self._failure(claimed, snapshot.change_seq, exc)
        resource = build_imaging_study(
            snapshot,
            self._mapping,
            patient_reference=references.patient.reference,
            order_reference=references.order.reference,
        )
        digest = content_hash(resource)
        published = Published(
            study_uid=study_uid, change_seq=snapshot.change_seq, content_hash=digest, at=self._clock(), sent=False
        )
        if digest == snapshot.published_hash:
            return StudyResult(
                claimed=claimed, outcome=PublishOutcome.UNCHANGED, record=published, references=references
            )
        self._report_unmapped_issuers(snapshot.attributes)
        try:
            self._validate(resource)  # an invalid resource is never sent: the study is marked failed
            self._ensure_endpoints()
            put = self._put_study(resource, claimed.published_version)
        except PublishError as exc:
            return self._failure(claimed, snapshot.change_seq, exc)
        return StudyResult(
            claimed=claimed,
            outcome=PublishOutcome.PUBLISHED,
            record=replace(published, at=self._clock(), sent=True, version_id=put.version_id),
            put=put,
            series=len(snapshot.series),
            instances=snapshot.number_of_instances,
            references=references,
        )

    def _report_unmapped_issuers(self, study: StudyAttributes) -> None:
        """Say which issuer the configuration does not map, for each identifier about to be sent without a system
        for that reason (the issuer names an organisation; the PatientID itself is never logged)."""
        for identifier, issuer in unmapped_issuers(study, self._mapping):
            log.warning(
                "identifier_issuer_unknown",
                study_uid=study.study_uid,
                identifier=identifier,
                issuer=issuer,
                hint=f"add the issuer to {identifier}.issuers to give its identifiers a system",
            )
            self._observer.identifier_issuer_unknown(identifier=identifier, issuer=issuer)

    def _put_study(self, resource: FhirResource, version: str | None) -> PutResult:
        """Write the ImagingStudy without erasing what others added to it since we created it.

        Never written (``version`` None): a plain PUT creates it. Otherwise read the server's version, merge
        ours into it (``fhir/merge.py``: our elements replace theirs, theirs stay; a write of ours that merged
        earlier additions carries them again) and PUT ``If-Match`` the version read. 412 means someone wrote
        in between: read and merge again. Gone from the server (deleted): write ours, which recreates it.
        """
        if version is None:
            return self._fhir.put(resource)
        for _ in range(MAX_MERGE_ROUNDS):
            current = self._fhir.read(resource["resourceType"], resource["id"])
            if current is None:
                log.warning("study_recreated", resource_id=resource["id"], last_version=version)
                return self._fhir.put(resource)
            theirs, server_version = current
            if server_version != version:
                log.info("study_changed_on_server", resource_id=resource["id"], ours=version, theirs=server_version)
            try:
                return self._fhir.put(merge_imaging_study(resource, theirs), if_match=server_version)
            except PublishError as exc:
                if exc.http_status not in (404, 410, 412):
                    raise
            version = server_version
        raise PublishError(
            f"ImagingStudy/{resource['id']} changed on the server during each of {MAX_MERGE_ROUNDS} merges; "
            "will try again",
            retryable=True,
            http_status=412,
        )

    def _ensure_endpoints(self) -> None:
        """PUT each configured Endpoint whose content the server has not yet received from us (one worker at a
        time: the others wait for its answer rather than send the same Endpoint)."""
        with self._endpoints_lock:
            if len(self._endpoints_confirmed) < len(self._endpoints):
                self._endpoints_confirmed.update(self._index.endpoint_hashes())
            for endpoint_id, resource in self._endpoints.items():
                digest = content_hash(resource)
                if self._endpoints_confirmed.get(endpoint_id) == digest:
                    continue
                self._validate(resource)
                result = self._fhir.put(resource)
                self._index.mark_endpoint_published(endpoint_id, content_hash=digest, now=self._clock())
                self._endpoints_confirmed[endpoint_id] = digest
                log.info("endpoint_published", endpoint_id=endpoint_id, http_status=result.http_status)

    def _failure(self, claimed: ClaimedStudy, change_seq: int, error: PublishError) -> StudyResult:
        """A retry after the backoff, or failed: a refusal, or a retryable failure after ``max_attempts``."""
        study_uid = claimed.study_uid
        attempt = claimed.attempts + 1
        exhausted = error.retryable and 0 < self._max_attempts <= attempt
        if error.retryable and not exhausted:
            retry_after = (
                timedelta(seconds=error.retry_after_seconds) if error.retry_after_seconds is not None else None
            )
            delay = retry_delay(attempt, self._retry, retry_after=retry_after, random_fraction=self._random_fraction())
            now = self._clock()
            # Retry-After is a floor: once it has passed, a server that answers again releases the study at once.
            # A 429 without one asked us to slow down without saying how long: its backoff holds.
            not_before = now + delay if retry_after is None and error.http_status == 429 else None
            if retry_after is not None:
                not_before = now + retry_after
            record = RetryLater(
                study_uid=study_uid, error=str(error), next_attempt_at=now + delay, not_before=not_before
            )
            return StudyResult(
                claimed=claimed, outcome=PublishOutcome.RETRY_SCHEDULED, record=record, error=error, retry_in=delay
            )
        reason = f"gave up after {attempt} attempts; the last: {error}" if exhausted else str(error)
        return StudyResult(
            claimed=claimed,
            outcome=PublishOutcome.FAILED,
            record=Refused(study_uid=study_uid, change_seq=change_seq, error=reason),
            error=error,
        )

    @staticmethod
    def _deferred(claimed: ClaimedStudy) -> StudyResult:
        return StudyResult(
            claimed=claimed, outcome=PublishOutcome.DEFERRED, record=Released(study_uid=claimed.study_uid)
        )

    # ---- the FHIR server's availability ---------------------------------------------------------------------

    def _note_server(self, result: StudyResult) -> None:
        """Tell the outage tracker what this study's requests got; an outage stops the pass's next starts."""
        now = self._clock()
        started: OutageStarted | None = None
        ended: OutageEnded | None = None
        with self._outage_lock:
            if result.error is not None and is_outage(result.error):
                started = self._outage.failed(result.error, now)
                self._pass_stops.set()
            elif result.server_answered:
                ended = self._outage.answered(now)
        if started is not None:
            self._outage_started(started, detected_by="publish")
        if ended is not None:
            self._outage_finished(ended)

    def _probe_if_due(self) -> None:
        with self._outage_lock:
            due = self._outage.probe_due(self._clock())
        if due:
            self._probe(at_start=False)

    def _probe(self, *, at_start: bool) -> None:
        """GET metadata; an answer makes every study waiting out a backoff due now (one a Retry-After holds, at
        its end)."""
        now = self._clock()
        try:
            self._fhir.probe()
        except PublishError as exc:
            if is_outage(exc):
                with self._outage_lock:
                    started = self._outage.failed(exc, now)
                if started is not None:
                    self._outage_started(started, detected_by="startup_check" if at_start else "probe")
                else:
                    log.debug("fhir_server_still_unavailable", error=str(exc))
                return
            # Refused, yet answered: the server is up (a 401 here also fails the studies, with the reason).
            log.warning("fhir_server_check_refused", http_status=exc.http_status, error=exc.detail)
        try:
            released = self._index.wake_backed_off(now)
            work_left = released > 0 or self._has_due_now(now)
        except IndexUnavailableError as exc:
            self._index_outage.failed("probe_release", exc)
            return
        with self._outage_lock:
            in_outage = self._outage.in_outage
            ended = self._outage.probe_answered(now, work_left=work_left)
            if in_outage:
                self._released_by_probe += released  # reported when the outage is found to have ended
        if at_start and not in_outage:
            log.info("fhir_server_reachable", fhir_base_url=self._fhir.base_url, studies_released=released)
        elif in_outage:
            log.info("fhir_server_answers_again", studies_released=released)
        if ended is not None:
            self._outage_finished(ended)

    def _has_due_now(self, now: datetime) -> bool:
        next_due = self._index.next_due_at()
        return next_due is not None and next_due <= now

    def _outage_started(self, started: OutageStarted, *, detected_by: str) -> None:
        self._observer.fhir_outage_started()
        log.warning(
            "fhir_outage_started",
            fhir_base_url=self._fhir.base_url,
            cause=started.cause,
            http_status=started.http_status,
            detected_by=detected_by,
            probe_interval_seconds=self._probe_interval.total_seconds(),
        )

    def _outage_finished(self, ended: OutageEnded) -> None:
        """Log the end of an outage with the studies waiting then (those being published included: their results
        are not recorded yet), releasing the studies still in a backoff."""
        self._observer.fhir_outage_ended(seconds=ended.seconds)
        with self._outage_lock:
            released, self._released_by_probe = self._released_by_probe, 0
        try:
            released += self._index.wake_backed_off(self._clock())
            waiting: int | None = self._index.count_by_state().pending
        except IndexUnavailableError as exc:
            log.error("outage_release_failed", error=str(exc))
            waiting = None
        log.info(
            "fhir_outage_ended",
            fhir_base_url=self._fhir.base_url,
            outage_seconds=round(ended.seconds, 1),
            failed_requests=ended.failed_requests,
            studies_waiting=waiting,
            studies_released=released,
        )

    def _summarize_outage(self) -> None:
        """Once a minute during an outage: how long, how many requests failed, how many studies wait."""
        with self._outage_lock:
            summary = self._outage.summary_due(self._clock())
            answering = self._outage.answering
        if answering and not self._pass_stops.is_set():
            # A probe was answered and this pass sent nothing that failed: nothing contradicts the answer.
            with self._outage_lock:
                ended = self._outage.answered(self._clock())
            if ended is not None:
                self._outage_finished(ended)
            return
        if summary is None:
            return
        try:
            waiting: int | None = self._index.count_by_state().pending
        except IndexUnavailableError:
            waiting = None
        log.warning(
            "fhir_outage_continues",
            fhir_base_url=self._fhir.base_url,
            since=summary.since.isoformat(timespec="seconds"),
            outage_seconds=round(summary.seconds),
            failed_requests=summary.failed_requests,
            last_error=summary.last_cause,
            studies_waiting=waiting,
        )
