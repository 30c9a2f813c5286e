"""Prometheus metrics (``pacs_bridge_*``), fed by the listener and the publisher through ``BridgeObserver``.

Study counts by state and the age of the longest-waiting pending study are read from the index at scrape time,
so they are right even with several bridges sharing one database. ``deploy/prometheus/`` alerts on these
metrics and ``deploy/grafana/`` charts them; a test keeps both to the names exported here.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pacs_bridge.backfill_runs import BackfillTotals, RunState
from pacs_bridge.observe import ASSOCIATION_REFUSAL_REASONS
from pacs_bridge.study_queue import RelinkCounts, StateCounts

# Seconds from a study's last indexed change to its successful publish: the quiet period plus the tick,
# the PUT, and any retries. Buckets span a short test quiet period to hours of FHIR outage.
PUBLISH_LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600, 14400)

# The issuer label comes from received datasets: bounded, so a sender cannot grow the registry without end. An
# issuer beyond the first ISSUER_LABELS distinct ones of a process is counted as OTHER_ISSUER; a label holds at
# most ISSUER_LABEL_CHARACTERS (IssuerOfPatientID is LO: 64).
ISSUER_LABELS = 50
ISSUER_LABEL_CHARACTERS = 64
OTHER_ISSUER = "(other)"


class _StudyStateCollector(Collector):
    def __init__(
        self,
        count_by_state: Callable[[], StateCounts],
        oldest_pending_since: Callable[[], datetime | None] | None,
        clock: Callable[[], datetime],
    ) -> None:
        self._count_by_state = count_by_state
        self._oldest_pending_since = oldest_pending_since
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("pacs_bridge_studies", "Studies in the index by publish state", labels=["state"])
        try:
            counts = self._count_by_state()
            since = self._oldest_pending_since() if self._oldest_pending_since is not None else None
        except Exception:  # a scrape must not fail because the database is down; /readyz says why
            return
        for state in ("pending", "published", "failed"):
            family.add_metric([state], getattr(counts, state))
        yield family
        if self._oldest_pending_since is not None:
            yield GaugeMetricFamily(
                "pacs_bridge_oldest_pending_study_age_seconds",
                "Seconds since the first unpublished change of the longest-waiting pending study (0: none pending)",
                value=max((self._clock() - since).total_seconds(), 0.0) if since is not None else 0.0,
            )


class _BackfillCollector(Collector):
    """``pacs_bridge_backfill_*`` from the index: a backfill runs as its own process (``pacs-bridge backfill``),
    and its progress is kept in the database, so the service's scrape reports it. The study counters add up the
    windows every run has done (a window retried counts once, when done); the failures counter every failure
    reported. The gauges follow the running run (``BackfillTotals.latest``)."""

    _COUNTERS = (
        ("studies_found", "Studies found in the PACS, counted when the backfill window holding them is done"),
        ("studies_indexed", "Studies a backfill indexed with a new or changed instance, when their window is done"),
        (
            "studies_unchanged",
            "Studies a backfill found already indexed as the PACS holds them, when their window is done",
        ),
        ("instances_indexed", "Instances a backfill indexed (new or changed), when their window is done"),
        ("failures", "Windows and studies a backfill could not index, each time (the run goes on; rerun to retry)"),
    )

    def __init__(self, totals: Callable[[], BackfillTotals]) -> None:
        self._totals = totals

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return iter(())  # read at scrape time only: the registry must not call collect() to describe it

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            totals = self._totals()
        except Exception:  # a scrape must not fail because the database is down; /readyz says why
            return
        for name, documentation in self._COUNTERS:
            yield CounterMetricFamily(f"pacs_bridge_backfill_{name}", documentation, value=getattr(totals.counts, name))
        latest = totals.latest
        yield GaugeMetricFamily(
            "pacs_bridge_backfill_running",
            "1 while a backfill run is running (or its process died without ending it)",
            value=1 if latest is not None and latest.state == RunState.RUNNING.value else 0,
        )
        # Declared (with a sample once a run exists) from the start, so that alert rules always find them.
        progress = GaugeMetricFamily(
            "pacs_bridge_backfill_last_progress_timestamp_seconds",
            "Unix time at which the running backfill run (else the last one) last recorded progress",
        )
        remaining = GaugeMetricFamily(
            "pacs_bridge_backfill_days_remaining",
            "Study dates the running backfill run (else the last one) has still to cover",
        )
        if latest is not None:
            progress.add_metric([], latest.updated_at.timestamp())
            remaining.add_metric([], max(latest.days_total - latest.counts.days_done, 0))
        yield progress
        yield remaining


class _RelinkQueueCollector(Collector):
    """The relink queue, read from the index at scrape time (so right with several bridges on one database)."""

    def __init__(self, relink_counts: Callable[[], RelinkCounts]) -> None:
        self._relink_counts = relink_counts

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # read at scrape time only: the registry must not query the database to describe it

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._relink_counts()
        except Exception:  # a scrape must not fail because the database is down; /readyz says why
            return
        waiting = GaugeMetricFamily(
            "pacs_bridge_relink_waiting_studies",
            "Studies published with subject (link=patient) or basedOn (link=order) by identifier only, whose "
            "Patient or ServiceRequest the relink pass still looks for",
            labels=["link"],
        )
        waiting.add_metric(["patient"], counts.patient_waiting)
        waiting.add_metric(["order"], counts.order_waiting)
        yield waiting
        yield GaugeMetricFamily(
            "pacs_bridge_relink_due_studies",
            "Published studies whose relink lookup is due now; one that stays up means relinking does not keep up "
            "(or the FHIR server does not answer)",
            value=counts.due,
        )


class BridgeMetrics:
    """The bridge's Prometheus registry; implements ``observe.BridgeObserver``.

    ``oldest_pending_since`` (the first unpublished change of the longest-waiting pending study, read at scrape
    time) and ``max_delay_seconds`` (``debounce.max_delay_seconds``) let an alert tell a study waiting too long
    from one still within its debounce, whatever the configuration. ``relink_counts``: the relink queue
    (``publish.relink_seconds`` above 0), exported as ``pacs_bridge_relink_waiting_studies`` and
    ``pacs_bridge_relink_due_studies``; None: not exported.
    """

    def __init__(
        self,
        count_by_state: Callable[[], StateCounts],
        *,
        oldest_pending_since: Callable[[], datetime | None] | None = None,
        max_delay_seconds: float | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        backfill_totals: Callable[[], BackfillTotals] | None = None,
        relink_counts: Callable[[], RelinkCounts] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._store_results = Counter(
            "pacs_bridge_cstore_results",
            "C-STORE requests answered, by DIMSE status and calling AE title",
            ["status", "calling_ae"],
            registry=self.registry,
        )
        self._bytes_received = Counter(
            "pacs_bridge_received_bytes", "Bytes of DICOM datasets received by C-STORE", registry=self.registry
        )
        self._open_associations = Gauge(
            "pacs_bridge_open_associations", "DICOM associations open now", registry=self.registry
        )
        refused = Counter(
            "pacs_bridge_associations_refused",
            "DICOM association requests refused (A-ASSOCIATE-RJ, or A-ABORT before or just after acceptance), by "
            "reason: " + ", ".join(ASSOCIATION_REFUSAL_REASONS),
            ["reason"],
            registry=self.registry,
        )
        # Every reason is exported from the start (0), so that a rate over it is defined before the first refusal.
        self._refusals = {reason: refused.labels(reason=reason) for reason in ASSOCIATION_REFUSAL_REASONS}
        self._publish_attempts = Counter(
            "pacs_bridge_publish_attempts",
            "ImagingStudy publish attempts, by HTTP status (none: no answer) and outcome",
            ["http_status", "outcome"],
            registry=self.registry,
        )
        self._retries = Counter(
            "pacs_bridge_publish_retries",
            "Publish attempts that failed and were scheduled again",
            registry=self.registry,
        )
        self._publish_latency = Histogram(
            "pacs_bridge_publish_latency_seconds",
            "Seconds from a study's last indexed change to its successful publish",
            buckets=PUBLISH_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._last_pass = Gauge(
            "pacs_bridge_last_publish_pass_timestamp_seconds",
            "Unix time at which the last publishing pass ended",
            registry=self.registry,
        )
        self._issuers_unknown = {
            identifier: Counter(
                f"pacs_bridge_{identifier}_issuer_unknown",
                f"ImagingStudy writes whose {identifier} identifier was sent without a system because the study "
                f"names an issuer that {identifier}.issuers does not map, by issuer",
                ["issuer"],
                registry=self.registry,
            )
            for identifier in ("patient", "accession")
        }
        self._issuer_labels: set[str] = set()
        # NaN until the first publish attempt: an alert on `== 0` then stays quiet.
        self._fhir_answered = Gauge(
            "pacs_bridge_fhir_last_attempt_answered",
            "1 when the FHIR server (or its token endpoint) answered the last publish attempt with any HTTP status, "
            "0 when it did not answer (connection refused, timeout, TLS failure)",
            registry=self.registry,
        )
        self._fhir_answered.set(math.nan)
        if max_delay_seconds is not None:
            Gauge(
                "pacs_bridge_debounce_max_delay_seconds",
                "debounce.max_delay_seconds: the longest a study waits for quiet before it is published",
                registry=self.registry,
            ).set(max_delay_seconds)
        self.registry.register(_StudyStateCollector(count_by_state, oldest_pending_since, clock))
        if backfill_totals is not None:
            self.registry.register(_BackfillCollector(backfill_totals))
        self._relink_lookups = Counter(
            "pacs_bridge_relink_lookups",
            "Lookups of a published study's waiting Patient (link=patient) or ServiceRequest (link=order) by the "
            "relink pass, by outcome: linked, no_match, several_matches, invalid_id, not_searchable, refused, "
            "unavailable",
            ["link", "outcome"],
            registry=self.registry,
        )
        if relink_counts is not None:
            self.registry.register(_RelinkQueueCollector(relink_counts))
        self._fhir_up = Gauge(
            "pacs_bridge_fhir_up",
            "1 while the FHIR server answers the publisher, 0 during an outage (no answer, 408, 429, 502-504)",
            registry=self.registry,
        )
        self._fhir_up.set(1)
        self._fhir_outages = Counter(
            "pacs_bridge_fhir_outages", "FHIR server outages seen by the publisher", registry=self.registry
        )
        self._fhir_outage_seconds = Counter(
            "pacs_bridge_fhir_outage_seconds",
            "Seconds of FHIR server outage, counted when each outage ends",
            registry=self.registry,
        )
        self._store_result_counters: dict[tuple[int, str], Any] = {}  # (status, calling AE) -> its child
        self._lock = threading.Lock()
        self.last_pass_monotonic: float | None = None

    def association_opened(self) -> None:
        self._open_associations.inc()

    def association_closed(self) -> None:
        self._open_associations.dec()

    def association_refused(self, *, reason: str) -> None:
        self._refusals.get(reason, self._refusals["other"]).inc()

    def instance_received(self, *, status: int, calling_ae: str, size_bytes: int, count: int = 1) -> None:
        # Once per C-STORE: the labelled child is looked up by a plain dict, not by labels() (which validates
        # and formats its arguments, under a lock).
        counter = self._store_result_counters.get((status, calling_ae))
        if counter is None:
            counter = self._store_results.labels(status=f"0x{status:04X}", calling_ae=calling_ae)
            self._store_result_counters[(status, calling_ae)] = counter
        counter.inc(count)
        self._bytes_received.inc(size_bytes)

    def publish_attempted(self, *, http_status: int | None, outcome: str) -> None:
        self._publish_attempts.labels(
            http_status=str(http_status) if http_status is not None else "none", outcome=outcome
        ).inc()
        if outcome == "retry_scheduled":
            self._retries.inc()
        # No HTTP status and a retry: nothing answered. No status and no retry is a study refused before
        # anything was sent (an invalid resource): it says nothing about the server.
        if http_status is not None:
            self._fhir_answered.set(1)
        elif outcome == "retry_scheduled":
            self._fhir_answered.set(0)

    def study_published(self, *, seconds_since_last_change: float) -> None:
        self._publish_latency.observe(max(seconds_since_last_change, 0.0))

    def publish_pass_completed(self) -> None:
        self._last_pass.set_to_current_time()
        with self._lock:
            self.last_pass_monotonic = time.monotonic()

    def identifier_issuer_unknown(self, *, identifier: str, issuer: str) -> None:
        counter = self._issuers_unknown.get(identifier)
        if counter is None:
            return
        label = issuer[:ISSUER_LABEL_CHARACTERS]
        with self._lock:
            if label not in self._issuer_labels:
                if len(self._issuer_labels) >= ISSUER_LABELS:
                    label = OTHER_ISSUER
                else:
                    self._issuer_labels.add(label)
        counter.labels(issuer=label).inc()

    def relink_looked_up(self, *, link: str, outcome: str) -> None:
        self._relink_lookups.labels(link=link, outcome=outcome).inc()

    def fhir_outage_started(self) -> None:
        self._fhir_up.set(0)
        self._fhir_outages.inc()

    def fhir_outage_ended(self, *, seconds: float) -> None:
        self._fhir_up.set(1)
        self._fhir_outage_seconds.inc(max(seconds, 0.0))

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
