"""The bridge's parts built from its ``Config``: the index on its database, the FHIR server's HTTP clients, the
settings of the DICOM listener and of the mapping. Shared by ``service`` (the running bridge), ``listener_processes``
(each listener process builds its own listener and index), ``cli`` and ``checks``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import structlog
from sqlalchemy import Engine

from pacs_bridge import __version__
from pacs_bridge.config import Config
from pacs_bridge.debounce import DebounceSettings
from pacs_bridge.dicom.listener_settings import ListenerSettings, server_tls_context
from pacs_bridge.errors import IndexNotFoundError, IndexUnavailableError
from pacs_bridge.fhir.auth import AuthSettings, SecretSource, TlsSettings, make_auth, make_ssl_context
from pacs_bridge.fhir.endpoint import EndpointSettings
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.engine import make_engine, sqlite_file
from pacs_bridge.index.repository import Index
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.redaction import redact_url

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
        message_screen=dicom.message_screen == "auto",
        allowed_calling_aets=dicom.calling_ae_rules(),
        max_inflated_bytes=dicom.max_inflated_bytes,
        tls=server_tls_context(dicom.tls.certificate, dicom.tls.private_key, dicom.tls.client_ca)
        if dicom.tls.enabled
        else None,
    )
