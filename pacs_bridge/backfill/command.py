"""Wiring for ``pacs-bridge backfill``: the configured PACS source, the ledger, the progress display and the
runner, with SIGINT/SIGTERM turned into a clean stop (a C-FIND under way is cancelled)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import FrameType
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy import Engine

from pacs_bridge import __version__
from pacs_bridge.backfill.dicomweb import DicomWebSource
from pacs_bridge.backfill.dimse import CFindSource
from pacs_bridge.backfill.pacing import Pacer
from pacs_bridge.backfill.progress import progress_reporter
from pacs_bridge.backfill.runner import BackfillRequest, BackfillRunner, BackfillSummary, InstanceSink
from pacs_bridge.backfill.source import StudySource
from pacs_bridge.config import Config, PacsConfig
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.auth import BasicAuth, BearerAuth, SecretAuth, SecretSource
from pacs_bridge.index.backfill_progress import BackfillLedger

log = structlog.get_logger("pacs_bridge.backfill")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def pacs_section(config: Config, source: str, *, config_path: str) -> PacsConfig:
    """The ``pacs`` section, checked to have what ``--source`` needs; ``ConfigError`` naming the key if not."""
    pacs = config.pacs
    if source == "dicomweb" and (pacs is None or not pacs.dicomweb_url):
        raise ConfigError(
            config_path, ["at 'pacs.dicomweb_url': --source dicomweb needs the PACS's DICOMweb base URL here"]
        )
    if pacs is None or (source == "dimse" and pacs.dimse is None):
        raise ConfigError(config_path, ["at 'pacs.dimse': --source dimse needs the PACS's {ae_title, host, port} here"])
    return pacs


def dicomweb_auth(pacs: PacsConfig) -> SecretAuth | None:
    """The ``pacs.auth`` flow, its secret read now (``CredentialsError`` naming the key when it cannot be)."""
    auth = pacs.auth
    if auth.mode == "bearer":
        return BearerAuth(SecretSource(key="pacs.auth.token", env=auth.token_env, file=auth.token_file).read())
    if auth.mode == "basic":
        password = SecretSource(key="pacs.auth.password", env=auth.password_env, file=auth.password_file).read()
        return BasicAuth(auth.username, password)
    return None


def open_source(config: Config, pacs: PacsConfig, source: str, pacer: Pacer) -> StudySource:
    if source == "dicomweb":
        auth = dicomweb_auth(pacs)
        url = urlsplit(pacs.dicomweb_url)
        if auth is not None and url.scheme == "http" and url.hostname not in ("127.0.0.1", "::1", "localhost"):
            log.warning("pacs_credentials_sent_in_clear", dicomweb_url=pacs.dicomweb_url, mode=pacs.auth.mode)
        http = httpx.Client(
            timeout=pacs.timeout_seconds,
            auth=auth,
            headers={"User-Agent": f"pacs-bridge/{__version__}"},
        )
        return DicomWebSource(
            http,
            base_url=pacs.dicomweb_url,
            pacer=pacer,
            page_size=pacs.qido_limit,
            max_response_bytes=int(pacs.max_response_megabytes * 1024 * 1024),
            max_attempts=pacs.max_attempts,
        )
    dimse = pacs.dimse
    if dimse is None:  # pacs_section refuses it first
        raise ValueError("--source dimse without pacs.dimse")
    return CFindSource(
        calling_ae_title=config.dicom.ae_title,
        called_ae_title=dimse.ae_title,
        host=dimse.host,
        port=dimse.port,
        pacer=pacer,
        max_results=dimse.max_results,
        timeout_seconds=pacs.timeout_seconds,
    )


@contextmanager
def stop_on_signals(stopping: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stopping`` while the block runs (a second one stops waiting politely)."""

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        log.info("backfill_stop_requested", signal=signal.Signals(signum).name)
        stopping.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_backfill(
    config: Config,
    request: BackfillRequest,
    *,
    engine: Engine | None,
    index: InstanceSink | None,
    config_path: str,
    on_terminal: bool | None = None,
) -> BackfillSummary:
    """Run ``request`` against the configured PACS into ``index``; returns what it did. A dry run compares with
    ``index`` read only, or with none (``engine`` and ``index`` None: there is no index yet)."""
    pacs = pacs_section(config, request.source, config_path=config_path)
    stopping = threading.Event()
    pacer = Pacer(pacs.max_requests_per_second, stopping)
    source = open_source(config, pacs, request.source, pacer)
    runner = BackfillRunner(
        source=source,
        sink=index,
        ledger=BackfillLedger(engine) if engine is not None else None,
        reporter=progress_reporter(on_terminal=on_terminal),
        clock=_utc_now,
    )
    with stop_on_signals(stopping):
        return runner.run(request)
