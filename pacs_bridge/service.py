"""Composition root: builds the engine, index, FHIR client, publisher, scheduler and DICOM listener from the
configuration, starts them, and stops them in the order that loses nothing.

Stop order: the listener first (no new associations; in-flight C-STOREs finish and commit), then the
scheduler (a running publishing pass completes). Whatever is still pending stays in the database and is
published after the next start.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from datetime import UTC, datetime, timedelta
from types import FrameType
from zoneinfo import ZoneInfo

import httpx
import structlog
from sqlalchemy import Engine

from pacs_bridge import __version__
from pacs_bridge.config import Config
from pacs_bridge.dicom.scp import DicomListener, ListenerSettings
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.engine import create_schema, make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.debounce import DebounceSettings, RetrySettings
from pacs_bridge.publish.publisher import Publisher
from pacs_bridge.publish.scheduler import PublishScheduler

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
            )
            for endpoint in config.endpoints
        ),
        patient_identifier_system=config.patient.identifier_system,
        accession_identifier_system=config.accession.identifier_system,
        site_zone=ZoneInfo(config.site.timezone) if config.site.timezone else None,
    )


def open_index(config: Config) -> tuple[Engine, Index]:
    """The engine and index for ``database.url``; the schema is created on first use."""
    engine = make_engine(config.database.url)
    try:
        create_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine, Index(engine, DebounceSettings(quiet_period=config.quiet_period, max_delay=config.max_delay))


class BridgeService:
    """One running bridge: listener + publisher over one database."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._stop_requested = threading.Event()
        self.engine, self.index = open_index(config)
        self._http = httpx.Client(
            timeout=config.fhir.timeout_seconds, headers={"User-Agent": f"pacs-bridge/{__version__}"}
        )
        self.publisher = Publisher(
            index=self.index,
            fhir=FhirClient(self._http, base_url=config.fhir.base_url),
            mapping=mapping_settings(config),
            retry=RetrySettings(
                base=timedelta(seconds=config.publish.retry_base_seconds),
                cap=timedelta(seconds=config.publish.retry_max_seconds),
            ),
            clock=utc_now,
            claimer=f"{socket.gethostname()}:{os.getpid()}",
            batch_size=config.publish.batch_size,
            # Long enough for one study's PUTs (Endpoint + ImagingStudy) to time out; a dead bridge's claims
            # come back after it.
            lease=timedelta(seconds=2 * config.fhir.timeout_seconds + 30),
        )
        self._scheduler = PublishScheduler(
            self.publisher.run_once, interval=timedelta(seconds=config.debounce.tick_seconds)
        )
        dicom = config.dicom
        self.listener = DicomListener(
            ListenerSettings(
                ae_title=dicom.ae_title,
                bind=dicom.bind,
                port=dicom.port,
                max_associations=dicom.max_associations,
                network_timeout_seconds=dicom.network_timeout_seconds,
            ),
            self.index,
            clock=utc_now,
        )

    def start(self) -> None:
        self.listener.start()
        self._scheduler.start()
        log.info(
            "bridge_started",
            version=__version__,
            database=self.engine.url.render_as_string(hide_password=True),
            fhir_base_url=self._config.fhir.base_url,
            port=self.listener.port,
        )

    def stop(self) -> None:
        log.info("bridge_stopping")
        self.listener.stop()
        self._scheduler.stop()
        self._http.close()
        self.engine.dispose()
        log.info("bridge_stopped")

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
