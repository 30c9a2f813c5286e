"""One publishing pass: claim due studies, build each ImagingStudy, send it only if it changed, record it.

The index, the FHIR client and the mapping settings come in through the constructor; this module owns only
the sequence. One study's failure never stops the pass, and ``run_once`` itself never raises.
"""

from __future__ import annotations

import enum
import functools
import random
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from pacs_bridge.errors import IndexUnavailableError, PublishError
from pacs_bridge.fhir.client import FhirClient, PutResult
from pacs_bridge.fhir.endpoint import build_endpoint
from pacs_bridge.fhir.imaging_study import MappingSettings, build_imaging_study, unmapped_issuers
from pacs_bridge.fhir.merge import merge_imaging_study
from pacs_bridge.fhir.resource import FhirResource, content_hash
from pacs_bridge.fhir.validation import validate_resource
from pacs_bridge.index.repository import ClaimedStudy, Index
from pacs_bridge.observe import BridgeObserver, NullObserver
from pacs_bridge.publish.debounce import RetrySettings, retry_delay
from pacs_bridge.publish.references import DEFAULT_RELINK_INTERVAL, ReferenceResolver
from pacs_bridge.records import StudyAttributes

Clock = Callable[[], datetime]

log = structlog.get_logger("pacs_bridge.publish")

# Read, merge and write at most this often per attempt when others keep changing the resource meanwhile.
MAX_MERGE_ROUNDS = 3


class PublishOutcome(enum.Enum):
    PUBLISHED = "published"  # PUT done
    UNCHANGED = "unchanged"  # the resource equals the one last published: nothing sent
    RETRY_SCHEDULED = "retry_scheduled"  # a failure that may pass; pending with backoff
    FAILED = "failed"  # refused by the server; needs a change or the operator
    ERROR = "error"  # our own failure (e.g. the database); the lease runs out and it is tried again


class Publisher:
    def __init__(
        self,
        *,
        index: Index,
        fhir: FhirClient,
        mapping: MappingSettings,
        retry: RetrySettings,
        clock: Clock,
        claimer: str,
        batch_size: int = 16,
        lease: timedelta = timedelta(minutes=5),
        random_fraction: Callable[[], float] = random.random,
        observer: BridgeObserver | None = None,
        max_attempts: int = 0,
        validate: Callable[[FhirResource], None] | None = None,
        probe_interval: timedelta = timedelta(seconds=15),
        relink_interval: timedelta = DEFAULT_RELINK_INTERVAL,
    ) -> None:
        """``max_attempts``: after this many failed attempts in a row a retryable failure marks the study
        failed too; 0 retries without limit. ``validate`` raises ``PublishError`` for a resource that must not be
        sent; by default each resource is validated against the FHIR models of ``mapping.fhir_version``.
        ``probe_interval``: while studies wait out a backoff and nothing else is due, the server is probed this
        often; when it answers, they are retried at once (``_probe_while_backed_off``). ``relink_interval``:
        ``publish.relink_seconds``, when a study published without the literal reference of its Patient or
        ServiceRequest is first looked up again (``publish/relink.py``)."""
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
        self._lease = lease
        self._random_fraction = random_fraction
        self._max_attempts = max_attempts
        self._observer: BridgeObserver = observer or NullObserver()
        self._endpoints = {
            settings.id: build_endpoint(settings, fhir_version=mapping.fhir_version, profile=mapping.profile)
            for settings in mapping.endpoints
        }
        self._endpoints_confirmed: dict[str, str] = {}
        self._probe_interval = probe_interval
        self._last_probe_at: datetime | None = None
        self._references = ReferenceResolver(
            fhir,
            mapping,
            index.links,
            relink_interval=relink_interval,
            validate=self._validate,
            exclusive=index.exclusive,
        )

    def run_once(self) -> dict[str, PublishOutcome]:
        """Publish every study due now (in batches); returns each claimed study's outcome. Never raises."""
        try:
            outcomes = self._run_batches()
            if not outcomes:
                self._probe_while_backed_off()
            return outcomes
        finally:
            self._observer.publish_pass_completed()

    def seconds_until_next_due(self) -> float | None:
        """How long until the earliest waiting study falls due (0 if one is due now); None when none waits or
        the index cannot say. Lets the caller run the next pass on time rather than at its next tick."""
        try:
            next_due = self._index.next_due_at()
        except IndexUnavailableError:
            return None
        return None if next_due is None else max(0.0, (next_due - self._clock()).total_seconds())

    def _probe_while_backed_off(self) -> None:
        """When studies wait out a backoff (up to ``publish.retry_max_seconds``) after the server failed, ask it
        every ``probe_interval`` whether it answers again (GET metadata); once it does, retry them now rather
        than at the end of their backoff. Studies the server itself told to wait (Retry-After, 429) keep it."""
        now = self._clock()
        if self._last_probe_at is not None and now - self._last_probe_at < self._probe_interval:
            return
        self._last_probe_at = now
        try:
            if self._index.wakeable_count(now) == 0:
                return
            self._fhir.probe()
            woken = self._index.wake_backed_off(self._clock())
        except IndexUnavailableError as exc:
            log.error("probe_failed", error=str(exc))
            return
        except PublishError as exc:
            log.debug("fhir_server_still_unavailable", error=str(exc))
            return
        if woken:
            log.info("fhir_server_answers_again", studies_retried_now=woken)

    def _run_batches(self) -> dict[str, PublishOutcome]:
        outcomes: dict[str, PublishOutcome] = {}
        while True:
            try:
                claimed = self._index.claim_due_studies(
                    self._clock(), limit=self._batch_size, lease=self._lease, claimer=self._claimer
                )
            except IndexUnavailableError as exc:
                log.error("claim_failed", error=str(exc))
                return outcomes
            fresh = [study for study in claimed if study.study_uid not in outcomes]
            for study in fresh:
                outcomes[study.study_uid] = self._publish_claimed(study)
            # A study released after an error may be claimed again at once: never loop on it within a pass.
            if len(claimed) < self._batch_size or len(fresh) < len(claimed):
                return outcomes

    def _publish_claimed(self, claimed: ClaimedStudy) -> PublishOutcome:
        log_ = log.bind(study_uid=claimed.study_uid)
        try:
            return self.publish(claimed)
        except Exception:  # the pass goes on with the next study; the lease expiry brings this one back
            log_.exception("publish_crashed")
            try:
                self._index.release_claim(claimed.study_uid)
            except IndexUnavailableError as exc:
                log_.error("release_failed", error=str(exc))
            return PublishOutcome.ERROR

    def publish(self, claimed: ClaimedStudy) -> PublishOutcome:
        """Publish one claimed study; the index records the outcome."""
        study_uid = claimed.study_uid
        snapshot = self._index.load_snapshot(study_uid)
        try:  # no request in identifier modes
            references = self._references.resolve(snapshot.attributes)
        except PublishError as exc:
            outcome = self._record_failure(claimed, snapshot.change_seq, exc)
            self._observer.publish_attempted(http_status=exc.http_status, outcome=outcome.value)
            return outcome
        resource = build_imaging_study(
            snapshot,
            self._mapping,
            patient_reference=references.patient.reference,
            order_reference=references.order.reference,
        )
        digest = content_hash(resource)
        if digest == snapshot.published_hash:
            self._index.mark_published(
                study_uid, change_seq=snapshot.change_seq, content_hash=digest, now=self._clock(), sent=False
            )
            self._references.record(study_uid, references, now=self._clock())
            log.info("study_unchanged", study_uid=study_uid, change_seq=snapshot.change_seq)
            return PublishOutcome.UNCHANGED
        self._report_unmapped_issuers(snapshot.attributes)
        try:
            self._validate(resource)  # an invalid resource is never sent: the study is marked failed
            self._ensure_endpoints()
            result = self._put_study(resource, claimed.published_version)
        except PublishError as exc:
            outcome = self._record_failure(claimed, snapshot.change_seq, exc)
            self._observer.publish_attempted(http_status=exc.http_status, outcome=outcome.value)
            return outcome
        self._index.mark_published(
            study_uid,
            change_seq=snapshot.change_seq,
            content_hash=digest,
            now=self._clock(),
            sent=True,
            version_id=result.version_id,
        )
        self._references.record(study_uid, references, now=self._clock())
        self._observer.publish_attempted(http_status=result.http_status, outcome=PublishOutcome.PUBLISHED.value)
        if claimed.last_change_at is not None:
            waited = (self._clock() - claimed.last_change_at).total_seconds()
            self._observer.study_published(seconds_since_last_change=waited)
        log.info(
            "study_published",
            study_uid=study_uid,
            http_status=result.http_status,
            version_id=result.version_id,
            series=len(snapshot.series),
            instances=snapshot.number_of_instances,
            attempt=claimed.attempts + 1,
        )
        return PublishOutcome.PUBLISHED

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
        """PUT each configured Endpoint whose content the server has not yet received from us."""
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

    def _record_failure(self, claimed: ClaimedStudy, change_seq: int, error: PublishError) -> PublishOutcome:
        study_uid = claimed.study_uid
        attempt = claimed.attempts + 1
        exhausted = error.retryable and 0 < self._max_attempts <= attempt
        if error.retryable and not exhausted:
            retry_after = (
                timedelta(seconds=error.retry_after_seconds) if error.retry_after_seconds is not None else None
            )
            delay = retry_delay(attempt, self._retry, retry_after=retry_after, random_fraction=self._random_fraction())
            next_attempt_at = self._clock() + delay
            # The server asked us to slow down: a probe that finds it answering must not bring the retry forward.
            asked_to_wait = retry_after is not None or error.http_status == 429
            self._index.mark_retry(
                study_uid,
                error=str(error),
                next_attempt_at=next_attempt_at,
                not_before=next_attempt_at if asked_to_wait else None,
            )
            log.warning(
                "publish_retry_scheduled",
                study_uid=study_uid,
                attempt=attempt,
                http_status=error.http_status,
                retry_in_seconds=round(delay.total_seconds(), 1),
                error=error.detail,
            )
            return PublishOutcome.RETRY_SCHEDULED
        reason = f"gave up after {attempt} attempts; the last: {error}" if exhausted else str(error)
        self._index.mark_failed(study_uid, change_seq=change_seq, error=reason)
        log.error("publish_failed", study_uid=study_uid, attempt=attempt, http_status=error.http_status, error=reason)
        return PublishOutcome.FAILED
