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
from datetime import UTC, datetime, timedelta
from types import FrameType
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import structlog
from sqlalchemy import Engine

from pacs_bridge import __version__
from pacs_bridge.config import Config
from pacs_bridge.dicom.scp import DicomListener, ListenerSettings, server_tls_context
from pacs_bridge.dicom.workers import ListenerPool
from pacs_bridge.errors import LISTEN_ERRNOS, IndexNotFoundError, IndexUnavailableError, ListenError, PacsBridgeError
from pacs_bridge.fhir.auth import AuthSettings, SecretSource, TlsSettings, make_auth, make_ssl_context
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.fhir.validation import load_models
from pacs_bridge.http import HealthServer
from pacs_bridge.index.backfill_progress import BackfillLedger
from pacs_bridge.index.engine import make_engine, sqlite_file
from pacs_bridge.index.group_commit import GroupCommit
from pacs_bridge.index.models import PublishState
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.publish.debounce import DebounceSettings, RetrySettings
from pacs_bridge.publish.index_outage import IndexOutageLog
from pacs_bridge.publish.publisher import Publisher
from pacs_bridge.publish.relink import Relinker
from pacs_bridge.publish.scheduler import PublishScheduler, next_pass_delay
from pacs_bridge.redaction import redact_url
from pacs_bridge.systemd import notify

log = structlog.get_logger("pacs_bridge.service")


def utc_now() -> datetime:
    return datetime.now(UTC)


def mapping_settings(config: Config) -> MappingSettings:
    return MappingSettings(
        endpoints=tuple(
            EndpointSettings(
                id=endpoint.id,
                connection_type=endpoint.connection_type,
                address=endpoint.address,
                name=endpoint.name,
                series_modalities=tuple(endpoint.series_modalities),
                series_calling_aets=tuple(endpoint.series_calling_aets),
            )
            for endpoint in config.endpoints
        ),
        patient_identifier_system=config.patient.identifier_system,
        patient_issuer_systems=dict(config.patient.issuers),
        patient_mode=config.patient.mode,
        accession_identifier_system=config.accession.identifier_system,
        accession_issuer_systems=dict(config.accession.issuers),
        accession_mode=config.accession.mode,
        site_zone=ZoneInfo(config.site.timezone) if config.site.timezone else None,
        location_reference=config.site.location,
        fhir_version=config.fhir.version,
        profile=config.fhir.profile,
        include_instances=config.publish.include_instances,
    )


def auth_settings(config: Config) -> AuthSettings:
    auth = config.fhir.auth

    def secret(key: str, env: str, file: str) -> SecretSource | None:
        return SecretSource(key=f"fhir.auth.{key}", env=env, file=file) if env or file else None

    return AuthSettings(
        mode=auth.mode,
        token=secret("token", auth.token_env, auth.token_file),
        username=auth.username,
        password=secret("password", auth.password_env, auth.password_file),
        token_url=auth.token_url,
        client_id=auth.client_id,
        client_secret=secret("client_secret", auth.client_secret_env, auth.client_secret_file),
        client_auth_method=auth.client_auth_method,
        scope=auth.scope,
        private_key_file=auth.private_key_file,
        algorithm=auth.algorithm,
        kid=auth.kid,
    )


def open_fhir_http(config: Config) -> tuple[httpx.Client, httpx.Client]:
    """The HTTP client for the FHIR server (TLS verified, ``fhir.auth`` applied) and the one its auth uses for
    token requests. Secrets and TLS files are read now: ``CredentialsError`` names the key that needs fixing."""
    tls = config.fhir.tls
    ssl_context = make_ssl_context(
        TlsSettings(ca_bundle=tls.ca_bundle, client_certificate=tls.client_certificate, client_key=tls.client_key)
    )

    def client(auth: httpx.Auth | None = None, *, connections: int = 4) -> httpx.Client:
        headers = {"User-Agent": f"pacs-bridge/{__version__}"}
        # Every publishing worker keeps its connection alive between studies (plus the probe's).
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.Client(
            timeout=config.fhir.timeout_seconds, headers=headers, verify=ssl_context, auth=auth, limits=limits
        )

    token_http = client()
    try:
        auth = make_auth(auth_settings(config), token_http=token_http)
    except BaseException:
        token_http.close()
        raise
    base = urlsplit(config.fhir.base_url)
    if auth is not None and base.scheme == "http" and base.hostname not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "fhir_credentials_sent_in_clear", fhir_base_url=redact_url(config.fhir.base_url), mode=config.fhir.auth.mode
        )
    return client(auth, connections=config.publish.concurrency + 2), token_http


def open_index(config: Config, *, config_path: str = "FILE", create: bool = False) -> tuple[Engine, Index]:
    """The engine and index for ``database.url``; an outdated schema is refused with the command that upgrades it.

    Only with ``create`` (``run``) is a missing index created; otherwise ``IndexNotFoundError`` names where it
    was looked for, and nothing is left behind (not even an empty SQLite file).
    """
    check_index_location(config, config_path=config_path, create=create)
    # The pool's default (5 + 10 overflow) would make publishing workers wait for connections above ~12.
    engine = make_engine(config.database.url, pool_size=max(5, config.publish.concurrency + 2))
    try:
        change = prepare_schema(engine, create=create, config_hint=config_path)
    except BaseException:
        engine.dispose()
        raise
    if change.created:
        log.info("index_created", database=redact_url(engine.url.render_as_string(hide_password=False)))
    return engine, index_on(engine, config)


def check_index_location(config: Config, *, config_path: str, create: bool) -> None:
    """For an SQLite index, before anything opens it (opening creates the file): without ``create`` the file must
    exist; with it, its directory must exist and be writable (SQLite keeps its journal files beside it)."""
    path = sqlite_file(config.database.url)
    if path is None:
        return
    directory = os.path.dirname(path)
    if not create:
        if not os.path.exists(path):
            raise IndexNotFoundError(
                f"no index database at {path} (database.url in {config_path}; a relative path is relative to that "
                "file's directory), and this command creates none. Check that this is the bridge's own configuration; "
                "pacs-bridge run creates the index at its first start"
            )
        return
    if not os.path.isdir(directory):
        raise IndexUnavailableError(
            f"cannot create the index database {path}: the directory {directory} does not exist; create it, or set "
            f"database.url in {config_path} to a file in an existing directory"
        )
    if not os.access(directory, os.W_OK):
        raise IndexUnavailableError(
            f"cannot write the index database {path}: this user may not write to {directory} (SQLite keeps "
            f"journal files beside the database); set database.url in {config_path} to a file in a writable "
            "directory, e.g. sqlite:////var/lib/pacs-bridge/pacs-bridge.db under systemd"
        )


def index_on(engine: Engine, config: Config) -> Index:
    """The index on ``engine`` with the configured debounce (the schema is the caller's business)."""
    return Index(engine, DebounceSettings(quiet_period=config.quiet_period, max_delay=config.max_delay))


def listener_settings(config: Config) -> ListenerSettings:
    dicom = config.dicom
    return ListenerSettings(
        ae_title=dicom.ae_title,
        bind=dicom.bind,
        port=dicom.port,
        max_associations=dicom.max_associations,
        network_timeout_seconds=dicom.network_timeout_seconds,
        # pynetdicom's ARTIM timer for what follows the request (release, abort); the request itself is whole
        # before pynetdicom sees the connection (dicom/front_door.py).
        acse_timeout_seconds=min(dicom.network_timeout_seconds, dicom.association_request_timeout_seconds),
        association_request_timeout_seconds=dicom.association_request_timeout_seconds,
        pdu_timeout_seconds=dicom.pdu_timeout_seconds,
        max_pending_connections=dicom.max_pending_connections,
        max_pdu_bytes=dicom.max_pdu_bytes,
        max_instance_bytes=dicom.max_instance_bytes,
        fast_path=dicom.fast_path == "auto",
        allowed_calling_aets=dicom.calling_ae_rules(),
        max_inflated_bytes=dicom.max_inflated_bytes,
        tls=server_tls_context(dicom.tls.certificate, dicom.tls.private_key, dicom.tls.client_ca)
        if dicom.tls.enabled
        else None,
    )


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
        if config.dicom.listener_processes > 1:
            self.listener = ListenerPool(
                listener_settings(config),
                processes=config.dicom.listener_processes,
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
        # published: one cost a 2000-instance study ~7 of its ~21 ms of CPU (docs/performance.md).
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
            self._stop_requested.wait()
        finally:
            self.stop()
        if self._failure is not None:
            raise PacsBridgeError(self._failure)
