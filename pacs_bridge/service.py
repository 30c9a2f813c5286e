"""Composition root: builds the engine, index, FHIR client, publisher, scheduler and DICOM listener from the
configuration, starts them, and stops them in the order that loses nothing.

Stop order: the listener first (no new associations; in-flight C-STOREs finish and commit), then the
scheduler (a running publishing pass completes). Whatever is still pending stays in the database and is
published after the next start.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import time
from datetime import datetime, timedelta
from types import FrameType

import structlog

from pacs_bridge import __version__
from pacs_bridge.config import Config
from pacs_bridge.debounce import RetrySettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.errors import LISTEN_ERRNOS, ListenError, PacsBridgeError
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.validation import load_models
from pacs_bridge.http import HealthServer
from pacs_bridge.index.backfill_progress import BackfillLedger
from pacs_bridge.index.group_commit import GroupCommit
from pacs_bridge.index.models import PublishState
from pacs_bridge.listener_processes import ListenerPool
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.publish.index_outage import IndexOutageLog
from pacs_bridge.publish.publisher import Publisher
from pacs_bridge.publish.relink import Relinker
from pacs_bridge.publish.scheduler import PublishScheduler, next_pass_delay
from pacs_bridge.redaction import redact_url
from pacs_bridge.systemd import notify
from pacs_bridge.wiring import listener_settings, mapping_settings, open_fhir_http, open_index, utc_now

log = structlog.get_logger("pacs_bridge.service")
_SIGNAL_CHECK_SECONDS = 0.2  # how soon the main thread runs a SIGTERM handler whichever thread took the signal


class PassHeartbeat:
    """When publishing passes start and end, to tell a ticking scheduler from a stopped or stuck one."""

    def __init__(self, *, stale_after: float, lease: float) -> None:
        self._stale_after = stale_after
        self._lease = lease
        self._lock = threading.Lock()
        self._started: float | None = None
        self._ended = time.monotonic()  # a fresh bridge counts as ticking until proven otherwise

    def pass_started(self) -> None:
        with self._lock:
            self._started = time.monotonic()

    def pass_progressed(self) -> None:
        """A running pass recorded a batch: it is working, however long it has been running."""
        with self._lock:
            if self._started is not None:
                self._started = time.monotonic()

    def pass_ended(self) -> None:
        with self._lock:
            self._started = None
            self._ended = time.monotonic()

    def problem(self) -> str | None:
        """None while passes end regularly (or one is running within its lease), else the reason."""
        now = time.monotonic()
        with self._lock:
            if self._started is not None:
                running = now - self._started
                return None if running < self._lease else f"a publishing pass has been running for {running:.0f} s"
            idle = now - self._ended
        return None if idle < self._stale_after else f"no publishing pass for {idle:.0f} s"


class BridgeService:
    """One running bridge: listener + publisher over one database."""

    def __init__(self, config: Config, *, config_path: str = "FILE") -> None:
        self._config = config
        self._stop_requested = threading.Event()
        # Credentials and TLS files first: a missing secret stops the bridge before it opens anything.
        self._http, self._token_http = open_fhir_http(config)
        self.engine, self.index = open_index(config, config_path=config_path, create=True)
        relink_interval = timedelta(seconds=config.publish.relink_seconds)
        self.metrics = BridgeMetrics(
            self.index.count_by_state,
            oldest_pending_since=self._oldest_pending_since,
            max_delay_seconds=config.debounce.max_delay_seconds,
            backfill_totals=BackfillLedger(self.engine).totals,
            relink_counts=(lambda: self.index.links.counts(utc_now())) if relink_interval else None,
        )
        self._heartbeat = PassHeartbeat(
            stale_after=max(60.0, 5 * config.debounce.tick_seconds), lease=self._publish_lease(config)
        )
        fhir = FhirClient(self._http, base_url=config.fhir.base_url)
        mapping = mapping_settings(config)
        claimer = f"{socket.gethostname()}:{os.getpid()}"
        index_outage = IndexOutageLog(clock=utc_now)  # one log of a database outage for both kinds of pass
        self.publisher = Publisher(
            index=self.index,
            fhir=fhir,
            mapping=mapping,
            retry=RetrySettings(
                base=timedelta(seconds=config.publish.retry_base_seconds),
                cap=timedelta(seconds=config.publish.retry_max_seconds),
            ),
            clock=utc_now,
            claimer=claimer,
            batch_size=config.publish.batch_size,
            concurrency=config.publish.concurrency,
            max_attempts=config.publish.max_attempts,
            observer=self.metrics,
            lease=timedelta(seconds=self._publish_lease(config)),
            probe_interval=timedelta(seconds=config.publish.probe_seconds),
            relink_interval=relink_interval,
            on_progress=self._heartbeat.pass_progressed,
            index_outage=index_outage,
        )
        self.relinker = Relinker(
            links=self.index.links,
            fhir=fhir,
            mapping=mapping,
            interval=relink_interval,
            clock=utc_now,
            claimer=claimer,
            batch_size=config.publish.batch_size,
            lease=timedelta(seconds=self._publish_lease(config)),
            pause=timedelta(seconds=config.publish.probe_seconds),
            observer=self.metrics,
            index_outage=index_outage,
        )
        self._scheduler = PublishScheduler(
            self._tick,
            interval=timedelta(seconds=config.debounce.tick_seconds),
            relink=self.relinker.run_once if self.relinker.enabled else None,
        )
        self._server_checked = False
        self._failure: str | None = None
        self.listener: DicomListener | ListenerPool
        if config.dicom.listener_process_count > 1:
            self.listener = ListenerPool(
                listener_settings(config),
                processes=config.dicom.listener_process_count,
                worker_config=config.model_dump_json(),
                observer=self.metrics,
                on_failure=self._fail,
            )
        else:
            self.listener = DicomListener(
                listener_settings(config), GroupCommit(self.index), clock=utc_now, observer=self.metrics
            )
        self._health: HealthServer | None = None
        if config.http is not None:
            self._health = HealthServer(
                bind=config.http.bind,
                port=config.http.port,
                readiness_checks={
                    "database": self.index.check_writable,
                    "scheduler": self._heartbeat.problem,
                    "listener": lambda: None if self.listener.is_accepting else "the DICOM listener is not accepting",
                },
                # Not a readiness check: while the FHIR server is down the bridge still takes and keeps every
                # instance, and taking it out of a load balancer would turn a FHIR outage into a DICOM one.
                degradation_checks={"fhir_server": self.publisher.fhir_server_problem},
                render_metrics=self.metrics.render,
            )
        self._watchdog_stop = threading.Event()

    def _oldest_pending_since(self) -> datetime | None:
        """The first unpublished change of the longest-waiting pending study, for the metric read at scrape time."""
        oldest = self.index.studies_in_state(PublishState.PENDING, limit=1)
        return oldest[0].first_change_at if oldest else None

    @staticmethod
    def _publish_lease(config: Config) -> float:
        # Long enough for one study's PUTs (Endpoint + ImagingStudy) to time out; a dead bridge's claims
        # come back after it.
        return 2 * config.fhir.timeout_seconds + 30

    def _tick(self) -> float:
        """One publishing pass (the first one asks the FHIR server whether it answers); returns the seconds
        until the next pass: the tick, or sooner when a study falls due or a probe is planned before."""
        self._heartbeat.pass_started()
        try:
            if not self._server_checked:
                self._server_checked = True
                self.publisher.check_server()
            self.publisher.run_once()
            return next_pass_delay(
                self._config.debounce.tick_seconds,
                self.publisher.seconds_until_next_due(),
                self.publisher.seconds_until_next_probe(),
            )
        finally:
            self._heartbeat.pass_ended()

    def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while the scheduler is healthy; a stuck bridge gets restarted."""
        while not self._watchdog_stop.wait(interval):
            if self._heartbeat.problem() is None:
                notify("WATCHDOG=1")

    def start(self) -> None:
        # What exists now (modules, SQLAlchemy's mappers, the FHIR models) lives as long as the process. Frozen,
        # it is left out of the collector's full collections, which otherwise walk all of it every few studies
        # published (docs/performance.md, "Publishing").
        load_models(self._config.fhir.version)
        gc.freeze()
        try:
            self.listener.start()
        except OSError as exc:
            if exc.errno not in LISTEN_ERRNOS:
                raise
            dicom = self._config.dicom
            raise ListenError(service="DICOM", key_prefix="dicom", bind=dicom.bind, port=dicom.port, cause=exc) from exc
        self._scheduler.start()
        if self._health is not None:
            self._health.start()
        watchdog_usec = os.environ.get("WATCHDOG_USEC")
        if watchdog_usec and watchdog_usec.isdigit():
            interval = int(watchdog_usec) / 1_000_000 / 3
            threading.Thread(target=self._watchdog, args=(interval,), name="pacs-bridge-watchdog", daemon=True).start()
        notify("READY=1")
        log.info(
            "bridge_started",
            version=__version__,
            database=redact_url(self.engine.url.render_as_string(hide_password=False)),
            fhir_base_url=redact_url(self._config.fhir.base_url),
            port=self.listener.port,
        )

    def stop(self) -> None:
        log.info("bridge_stopping")
        notify("STOPPING=1")
        self._watchdog_stop.set()
        self.publisher.request_stop()
        self.listener.stop(drain_timeout_seconds=self._config.dicom.shutdown_drain_seconds)
        self._scheduler.stop()
        if self._health is not None:
            self._health.stop()
        self._http.close()
        self._token_http.close()
        self.engine.dispose()
        log.info("bridge_stopped")

    def _fail(self, reason: str) -> None:
        """Stop the whole bridge, exiting non-zero (a listener process died): systemd restarts it whole."""
        self._failure = reason
        self._stop_requested.set()

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self._stop_requested.set()

    def run_until_stopped(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT, then stop cleanly."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        try:
            # Waits of a bounded length: the kernel may deliver the signal to any thread, while Python runs its
            # handler in the main thread only, between two bytecodes; a wait without a timeout never gets there.
            while not self._stop_requested.wait(_SIGNAL_CHECK_SECONDS):
                pass
        finally:
            self.stop()
        if self._failure is not None:
            raise PacsBridgeError(self._failure)
