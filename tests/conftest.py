"""Fixtures shared by every test layer: databases (SQLite and PostgreSQL), a settable clock, the FHIR server."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import Engine, create_engine, text

from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from tests.support.fault_proxy import HttpFaultProxy
from tests.support.fhir_server import FhirTestServer
from tests.support.private_postgres import PrivatePostgres

POSTGRES_URL = os.environ.get("PACS_BRIDGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUIET = timedelta(seconds=30)
MAX_DELAY = timedelta(seconds=300)


class FakeClock:
    """A settable UTC clock: tests move time explicitly instead of sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2024, 3, 15, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


# pydicom's and pynetdicom's process-wide settings that the bridge's code or a test may change
_DICOM_SETTINGS: tuple[tuple[object, str], ...] = (
    (pydicom_config.settings, "reading_validation_mode"),
    (pydicom_config.settings, "writing_validation_mode"),
    (pynetdicom_config, "STORE_RECV_CHUNKED_DATASET"),
    (pynetdicom_config, "STORE_SEND_CHUNKED_DATASET"),
    (pynetdicom_config, "LOG_HANDLER_LEVEL"),
)


@pytest.fixture(autouse=True)
def no_dicom_settings_leak() -> Iterator[None]:
    """Every test leaves pydicom's and pynetdicom's process-wide settings as it found them (a listener puts
    back what it changed when it stops): a test that does not fails here, and the settings are put back so
    that the next test starts from the same ones."""
    before = [getattr(owner, name) for owner, name in _DICOM_SETTINGS]
    yield
    after = [getattr(owner, name) for owner, name in _DICOM_SETTINGS]
    changed = {
        name: (was, now) for (_, name), was, now in zip(_DICOM_SETTINGS, before, after, strict=True) if was != now
    }
    for (owner, name), value in zip(_DICOM_SETTINGS, before, strict=True):
        setattr(owner, name, value)
    if changed:
        pytest.fail(f"the test left process-wide DICOM settings changed, (before, after): {changed}")


class _TracebackAsText(logging.Filter):
    """Turns a record's exception, and a message or arguments that are objects, into their text: the record lets go
    of the exception, its traceback and their frames."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[2] is not None:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if isinstance(record.msg, BaseException) or record.args:  # pynetdicom logs ``LOGGER.exception(exc)``
            record.msg, record.args = record.getMessage(), None
        return True


@pytest.fixture(scope="session", autouse=True)
def captured_pynetdicom_records_hold_no_frames() -> Iterator[None]:
    """pytest keeps every log record of a test until it ends; one that pynetdicom logs with its exception (the
    DUL's "Connection closed before the entire PDU was received" when an abort closes the socket under its
    read) would keep the traceback's frames, and with them the association, its unserved C-STORE and the file
    that C-STORE was received into, alive past every garbage collection. The bridge's own logging formats a
    record and drops it; in tests, pynetdicom's records keep the traceback as text only, as printed."""
    loggers = [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if (name == "pynetdicom" or name.startswith("pynetdicom.")) and isinstance(logger, logging.Logger)
    ]
    as_text = _TracebackAsText()
    for logger in loggers:
        logger.addFilter(as_text)
    yield
    for logger in loggers:
        logger.removeFilter(as_text)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


RECEIVE_PATHS = {"fast_path": "auto", "stock": "off"}  # -> dicom.fast_path


@pytest.fixture(scope="session", params=list(RECEIVE_PATHS))
def receive_path(request: pytest.FixtureRequest) -> str:
    """How the listener receives: with the fast path (``dicom.fast_path: auto``) or as stock pynetdicom
    (``off``). The listener's integration tests and every end-to-end test run both ways."""
    return str(request.param)


@pytest.fixture
def postgres_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    schema = f"pb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is not usable ({exc.__class__.__name__}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` or set "
            "PACS_BRIDGE_TEST_POSTGRES_URL"
        )
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the test's own (not the shared server), which the test may stop and start."""
    with PrivatePostgres() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The index database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("postgres_schema_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    prepare_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def index(engine: Engine) -> Index:
    return Index(engine, DebounceSettings(quiet_period=QUIET, max_delay=MAX_DELAY))


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirTestServer]:
    """One real FHIR R4 server (Medplum engine, R4 validation) on 127.0.0.1 for the whole session."""
    with FhirTestServer() as server:
        yield server


@pytest.fixture(scope="session")
def fhir_server_r5() -> Iterator[FhirTestServer]:
    """A second server speaking FHIR 5.0.0 that stores R5 resources unvalidated (FHIR_RELEASE=R5 in
    tests/fhir_server/server.mjs): tests check what it stored against the R5 models themselves."""
    with FhirTestServer(env={"FHIR_RELEASE": "R5"}) as server:
        yield server


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on 127.0.0.1: (client, accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        try:
            yield client, accepted
        finally:
            client.close()
            accepted.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """An HTTP client for FhirClient in tests; proxy settings from the environment are ignored (loopback only)."""
    with httpx.Client(timeout=10, trust_env=False) as client:
        yield client


@pytest.fixture
def proxy(fresh_fhir_server: FhirTestServer) -> Iterator[HttpFaultProxy]:
    """The fault-injecting proxy (tests/support/fault_proxy.py) in front of the emptied FHIR server."""
    with HttpFaultProxy(upstream_port=fresh_fhir_server.port) as running:
        yield running


@pytest.fixture
def fresh_fhir_server(fhir_server: FhirTestServer) -> FhirTestServer:
    """The session's FHIR server, emptied and with its request counters at zero."""
    fhir_server.reset()
    return fhir_server
