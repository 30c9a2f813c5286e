"""The YAML configuration file -> validated, typed settings.

Every problem is collected and reported with its key path (``fhir.base_url: …``); unknown keys get a
did-you-mean hint; a YAML syntax error or a repeated key is reported with its line and column. Relative paths
in the file (the SQLite file of ``database.url``, TLS and secret files) are relative to the file's own
directory, so every command finds the same files whatever its working directory. Only ``service`` (and the
CLI) read ``Config``; everything else receives plain values.
"""

from __future__ import annotations

import difflib
import re
import types
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pacs_bridge.dicom.access import CallingAeRule, parse_network
from pacs_bridge.dicom.header import DEFAULT_MAX_INFLATED_BYTES
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.accession import AccessionMode
from pacs_bridge.fhir.endpoint import CONNECTION_TYPES, IHE_IMR_CONNECTION_TYPES
from pacs_bridge.fhir.patient import PatientMode
from pacs_bridge.index.engine import normalized_database_url
from pacs_bridge.redaction import redact_url, redact_urls

_AE_TITLE = re.compile(r"[\x20-\x5B\x5D-\x7E]{1,16}")  # PS3.5 AE VR: no backslash, no control characters
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL, got {redact_url(value)!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Validation context key: the directory of the configuration file, against which relative paths resolve. Absent
# (a document validated without a file, or a listener process re-reading its parent's resolved settings):
# relative paths stay as written.
_CONFIG_DIRECTORY = "config_directory"


def _config_directory(info: ValidationInfo) -> Path | None:
    context = info.context
    directory = context.get(_CONFIG_DIRECTORY) if isinstance(context, dict) else None
    return directory if isinstance(directory, Path) else None


def _against_config_directory(value: Any, info: ValidationInfo) -> Any:
    """A relative file path made absolute against the configuration file's directory (empty stays empty)."""
    directory = _config_directory(info)
    if not isinstance(value, str) or not value or directory is None or Path(value).is_absolute():
        return value
    return str(directory / value)


# A file named in the configuration: a relative path is relative to the configuration file's directory.
ConfigFilePath = Annotated[str, BeforeValidator(_against_config_directory)]

_SQLITE_URL = re.compile(r"(?P<scheme>sqlite(?:\+\w+)?):///(?P<path>[^?]*)(?P<query>\?.*)?", re.DOTALL)


def sqlite_url_against(url: str, directory: Path) -> str:
    """``url`` with a relative SQLite file path made absolute against ``directory``; any other URL (PostgreSQL,
    an absolute path, an in-memory or ``file:`` URI database) unchanged."""
    match = _SQLITE_URL.fullmatch(url)
    if match is None:
        return url
    path = match["path"]
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).is_absolute():
        return url
    return f"{match['scheme']}:///{directory / path}{match['query'] or ''}"


def _checked_ae_title(value: str) -> str:
    if not _AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(f"expected 1 to 16 printable characters without backslash, got {value!r}")
    return value.strip()


class AllowedCallingAeConfig(_Section):
    """A calling AE title allowed to associate, optionally only from these addresses or networks."""

    ae_title: str
    addresses: list[str] = []

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _checked_ae_title(value)

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            parse_network(address)
        return value


def _readable_file(value: str) -> str:
    if value and not Path(value).is_file():
        raise ValueError(f"no readable file at {value!r}")
    return value


class DicomTlsConfig(_Section):
    """DICOM TLS (PS3.15 B.1): on when a certificate and key are given."""

    certificate: ConfigFilePath = ""  # PEM server certificate (chain)
    private_key: ConfigFilePath = ""  # PEM private key of that certificate
    client_ca: ConfigFilePath = ""  # PEM CA bundle; when set, senders must present a certificate it issued

    @field_validator("certificate", "private_key", "client_ca")
    @classmethod
    def _check_file(cls, value: str) -> str:
        return _readable_file(value)

    @model_validator(mode="after")
    def _certificate_with_key(self) -> DicomTlsConfig:
        if bool(self.certificate) != bool(self.private_key):
            raise ValueError("certificate and private_key go together: set both to turn DICOM TLS on, or neither")
        if self.client_ca and not self.certificate:
            raise ValueError("client_ca needs DICOM TLS on: set certificate and private_key too")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


class DicomConfig(_Section):
    ae_title: str = "PACS_BRIDGE"
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1, le=1000)
    # Connections whose A-ASSOCIATE-RQ is not yet whole; one more closes the oldest. They hold no thread.
    max_pending_connections: int = Field(default=256, ge=1, le=100_000)
    # Processes that serve associations; the main process accepts and hands each connection to the least busy
    # one. max_associations and max_pending_connections are shared among them.
    listener_processes: int = Field(default=1, ge=1, le=64)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    # The ARTIM timer (PS3.8 9.1.5): TLS handshake and the whole A-ASSOCIATE-RQ within this, from the connect.
    association_request_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Every PDU whole within this from its first byte, however slowly its bytes come.
    pdu_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # The maximum PDU length announced to senders (PS3.8 D.1); a longer P-DATA-TF aborts the association.
    max_pdu_bytes: int = Field(default=262_144, ge=4096, le=16 * 1024 * 1024)
    # A data set longer than this is read, dropped and refused (0xC002); nothing of it is stored.
    max_instance_bytes: int = Field(default=4 * 1024**3, ge=1024, le=2**40)
    # auto: the fast path (dicom/fastpath) with the pynetdicom release it supports; off: stock pynetdicom.
    fast_path: Literal["auto", "off"] = "auto"
    # On SIGTERM: how long open associations may go on before they are aborted (the sender re-sends).
    shutdown_drain_seconds: float = Field(default=30.0, ge=0, le=3600)
    # A deflated dataset inflating to more is refused (0xC000); it is inflated as a stream, never held whole.
    max_inflated_bytes: int = Field(default=DEFAULT_MAX_INFLATED_BYTES, ge=1)
    # Empty: any calling AE. Entries: an AE title, or {ae_title, addresses} to pin it to source addresses.
    allowed_calling_aets: list[AllowedCallingAeConfig] = []
    tls: DicomTlsConfig = DicomTlsConfig()

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _checked_ae_title(value)

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _titles_as_entries(cls, value: Any) -> Any:
        """A plain AE title is short for {ae_title: TITLE} (from any address)."""
        if isinstance(value, list):
            return [{"ae_title": entry} if isinstance(entry, str) else entry for entry in value]
        return value

    def calling_ae_rules(self) -> tuple[CallingAeRule, ...]:
        return tuple(
            CallingAeRule(ae_title=entry.ae_title, networks=tuple(parse_network(a) for a in entry.addresses))
            for entry in self.allowed_calling_aets
        )


class DatabaseConfig(_Section):
    # A relative SQLite path is relative to the configuration file's directory (validate_default: the default's
    # too).
    url: str = Field(default="sqlite:///pacs-bridge.db", validate_default=True)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        if not re.match(r"(sqlite|postgresql|postgres)(\+\w+)?://", value):
            raise ValueError(
                f"expected a URL such as sqlite:///PATH or postgresql+psycopg://HOST/DB, got {redact_url(value)!r}"
            )
        try:
            make_url(normalized_database_url(value)).get_dialect()  # parses it and loads its driver
        except (ArgumentError, ValueError) as exc:
            raise ValueError(
                f"not a database URL SQLAlchemy can use ({redact_urls(str(exc))}), got {redact_url(value)!r}; "
                "e.g. sqlite:///PATH or postgresql+psycopg://HOST/DB"
            ) from None
        directory = _config_directory(info)
        return sqlite_url_against(value, directory) if directory is not None else value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# fhir.auth keys that would hold a secret in the file itself: refused, naming the _env/_file keys to use.
_INLINE_SECRET_KEYS = {
    "token": ("token_env", "token_file"),
    "password": ("password_env", "password_file"),
    "client_secret": ("client_secret_env", "client_secret_file"),
    "private_key": ("private_key_file",),
}
# The fhir.auth keys each mode needs (a tuple: exactly one of them) and may use.
_AUTH_REQUIRED: dict[str, tuple[str | tuple[str, str], ...]] = {
    "none": (),
    "bearer": (("token_env", "token_file"),),
    "basic": ("username", ("password_env", "password_file")),
    "oauth2_client_credentials": ("token_url", "client_id", ("client_secret_env", "client_secret_file")),
    "smart_backend_services": ("token_url", "client_id", "private_key_file", "scope"),
}
_AUTH_OPTIONAL: dict[str, tuple[str, ...]] = {
    "oauth2_client_credentials": ("scope", "client_auth_method"),
    "smart_backend_services": ("algorithm", "kid"),
}


class FhirTlsConfig(_Section):
    """TLS towards the FHIR server and the token endpoint; certificates are always verified."""

    ca_bundle: ConfigFilePath = ""  # PEM file of the CAs to trust instead of the default ones; empty: the default
    client_certificate: ConfigFilePath = ""  # PEM certificate for mutual TLS; empty: none
    client_key: ConfigFilePath = ""  # PEM private key of client_certificate; empty: it is in the certificate file

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> FhirTlsConfig:
        if self.client_key and not self.client_certificate:
            raise ValueError("client_key is set without client_certificate; set both for mutual TLS, or neither")
        return self


class FhirAuthConfig(_Section):
    """How the bridge authenticates to the FHIR server. Secrets are named (environment variable or file), never
    written here."""

    mode: Literal["none", "bearer", "basic", "oauth2_client_credentials", "smart_backend_services"] = "none"
    token_env: str = ""
    token_file: ConfigFilePath = ""
    username: str = ""
    password_env: str = ""
    password_file: ConfigFilePath = ""
    token_url: str = ""
    client_id: str = ""
    client_secret_env: str = ""
    client_secret_file: ConfigFilePath = ""
    client_auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    scope: str = ""
    private_key_file: ConfigFilePath = ""
    algorithm: Literal["RS384", "ES384"] = "RS384"
    kid: str = ""

    @field_validator("token_env", "password_env", "client_secret_env")
    @classmethod
    def _check_env_name(cls, value: str) -> str:
        if value and not _ENV_NAME.fullmatch(value):
            # The value is not quoted: it may be the secret itself, written where its variable's name belongs.
            raise ValueError(
                "expected the name of an environment variable (letters, digits and _, e.g. "
                "PACS_BRIDGE_FHIR_PASSWORD); the secret itself belongs in that variable"
            )
        return value

    @field_validator("token_url")
    @classmethod
    def _check_token_url(cls, value: str) -> str:
        return _http_url(value) if value else value

    @model_validator(mode="after")
    def _keys_fit_the_mode(self) -> FhirAuthConfig:
        required = _AUTH_REQUIRED[self.mode]
        problems = []
        for need in required:
            if isinstance(need, tuple):
                given = [key for key in need if getattr(self, key)]
                if len(given) != 1:
                    problems.append(f"mode {self.mode} needs exactly one of {' or '.join(need)}")
            elif not getattr(self, need):
                problems.append(f"mode {self.mode} needs {need}")
        usable = {"mode", *_AUTH_OPTIONAL.get(self.mode, ())}
        usable.update(key for need in required for key in (need if isinstance(need, tuple) else (need,)))
        for key in sorted(self.model_fields_set - usable):
            if getattr(self, key) != type(self).model_fields[key].default:
                problems.append(f"{key} is not used with mode {self.mode}; remove it or change the mode")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class FhirConfig(_Section):
    base_url: str
    version: Literal["R4", "R5"] = "R4"
    # "ihe-imr": each ImagingStudy claims and meets the IHE IMR ImagingStudy profile (R4 only)
    profile: Literal["", "ihe-imr"] = ""
    timeout_seconds: float = Field(default=30.0, gt=0)
    tls: FhirTlsConfig = FhirTlsConfig()
    auth: FhirAuthConfig = FhirAuthConfig()

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return _http_url(value).rstrip("/")


class DebounceConfig(_Section):
    quiet_seconds: float = Field(default=30.0, ge=0)
    max_delay_seconds: float = Field(default=300.0, ge=0)
    tick_seconds: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _max_not_below_quiet(self) -> DebounceConfig:
        if self.max_delay_seconds < self.quiet_seconds:
            raise ValueError(
                f"max_delay_seconds ({self.max_delay_seconds:g}) must not be below quiet_seconds "
                f"({self.quiet_seconds:g})"
            )
        return self


class EndpointConfig(_Section):
    id: str
    connection_type: str
    address: str
    name: str = ""
    # Series-level endpoint: referenced from the series of these modalities, or first sent by these calling
    # AE titles, instead of from the study.
    series_modalities: list[str] = []
    series_calling_aets: list[str] = []

    @field_validator("series_calling_aets")
    @classmethod
    def _check_series_calling_aets(cls, value: list[str]) -> list[str]:
        return [_checked_ae_title(ae_title) for ae_title in value]

    @property
    def is_series_level(self) -> bool:
        return bool(self.series_modalities or self.series_calling_aets)

    @field_validator("series_modalities")
    @classmethod
    def _check_series_modalities(cls, value: list[str]) -> list[str]:
        for modality in value:
            if not re.fullmatch(r"[A-Z0-9_]{1,16}", modality):
                raise ValueError(f"expected DICOM modality codes such as MG or CT, got {modality!r}")
        return value

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _FHIR_ID.fullmatch(value):
            raise ValueError(f"expected a FHIR id (letters, digits, '-', '.', at most 64), got {value!r}")
        return value

    @field_validator("connection_type")
    @classmethod
    def _check_connection_type(cls, value: str) -> str:
        if value not in CONNECTION_TYPES:
            raise ValueError(f"expected one of {', '.join(sorted(CONNECTION_TYPES))}, got {value!r}")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        _http_url(value)
        if "?" in value:
            raise ValueError(f"the service base URL must not carry a query, got {redact_url(value)!r}")
        return value

    @model_validator(mode="after")
    def _iid_at_the_study_level_only(self) -> EndpointConfig:
        """An IHE IID endpoint launches a viewer on a study; the ImagingStudy rules use it at the study level only."""
        if self.connection_type == "ihe-iid" and self.is_series_level:
            raise ValueError(
                f"endpoint {self.id}: an ihe-iid endpoint (IHE Invoke Image Display) is for the study level only; "
                "remove series_modalities and series_calling_aets, or use another connection_type"
            )
        return self


_STUDY_UID_SYSTEM = "urn:dicom:uid"  # a patient or accession identifier under it would pass for the study's UID


def _checked_identifier_system(system: str) -> str:
    if not system or re.search(r"\s", system):
        raise ValueError(f"expected a URI without spaces, got {system!r}")
    if system == _STUDY_UID_SYSTEM:
        raise ValueError(f"{_STUDY_UID_SYSTEM} is the system of Study Instance UIDs; name your issuer's own system")
    return system


class _IssuedIdentifierSection(_Section):
    """An identifier's systems (docs/mapping.md, "Issuers"): ``identifier_system`` serves studies that name no
    issuer, never one naming an issuer; ``issuers`` maps issuer -> system. A study naming an issuer missing from
    ``issuers`` gets no system (never searched, linked or created) and the issuer as assigner.display."""

    identifier_system: str = ""
    issuers: dict[str, str] = {}

    @field_validator("identifier_system")
    @classmethod
    def _check_identifier_system(cls, value: str) -> str:
        return _checked_identifier_system(value) if value else value

    @field_validator("issuers")
    @classmethod
    def _check_issuers(cls, value: dict[str, str]) -> dict[str, str]:
        for issuer, system in value.items():
            try:
                _checked_identifier_system(system)
            except ValueError as exc:
                raise ValueError(f"for issuer {issuer!r}: {exc}") from None
        return value


class PatientConfig(_IssuedIdentifierSection):  # PatientID; issuers by IssuerOfPatientID
    # identifier: subject by identifier only; lookup: the server's Patient with that identifier; create: that
    # Patient, created when absent (docs/mapping.md). lookup and create need an identifier system.
    mode: PatientMode = "identifier"


class AccessionConfig(_IssuedIdentifierSection):
    """AccessionNumber; issuers by LocalNamespaceEntityID or UniversalEntityID (Issuer of Accession Number)."""

    # identifier: basedOn references the ServiceRequest by identifier only; lookup: also the one ServiceRequest
    # the server holds with that identifier (docs/mapping.md). An accession number without system is never searched.
    mode: AccessionMode = "identifier"


class SiteConfig(_Section):
    timezone: str = ""  # IANA name; empty: the host's time zone
    location: str = ""  # FHIR Location reference for ImagingStudy.location; empty: none

    @field_validator("location")
    @classmethod
    def _check_location(cls, value: str) -> str:
        if value and not re.fullmatch(r"Location/[A-Za-z0-9\-.]{1,64}", value):
            raise ValueError(f"expected a reference such as Location/radiology-1, got {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"expected an IANA time zone such as Europe/Paris, got {value!r}") from exc
        return value


class PublishConfig(_Section):
    batch_size: int = Field(default=64, ge=1, le=1000)  # studies claimed, and recorded, per transaction
    concurrency: int = Field(default=4, ge=1, le=64)  # studies published at once, one connection each
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=0, ge=0)  # 0: retry retryable failures without limit
    # During a FHIR outage, probe the server this often; once it answers, studies in backoff are retried.
    probe_seconds: float = Field(default=1.0, gt=0)
    include_instances: bool = True  # false: series without their instance lists (counts stay)
    # A study published with subject or basedOn by identifier only (patient.mode lookup/create, accession.mode
    # lookup) is looked up again this long after, then less and less often, at least daily; 0: never.
    relink_seconds: float = Field(default=900.0, ge=0, le=86_400)


class HttpConfig(_Section):
    """Health and metrics endpoints; the section is off when absent."""

    bind: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class PacsAuthConfig(_Section):
    """How the backfill authenticates to the PACS's DICOMweb service, as ``fhir.auth`` does: none, bearer or
    basic, secrets named (environment variable or file), never written here."""

    mode: Literal["none", "bearer", "basic"] = "none"
    token_env: str = ""
    token_file: ConfigFilePath = ""
    username: str = ""
    password_env: str = ""
    password_file: ConfigFilePath = ""

    @field_validator("token_env", "password_env")
    @classmethod
    def _check_env_name(cls, value: str) -> str:
        if value and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "expected the name of an environment variable (letters, digits and _, e.g. "
                "PACS_BRIDGE_PACS_PASSWORD); the secret itself belongs in that variable"
            )
        return value

    @model_validator(mode="after")
    def _keys_fit_the_mode(self) -> PacsAuthConfig:
        problems = []
        for need in _AUTH_REQUIRED[self.mode]:
            if isinstance(need, tuple):
                if len([key for key in need if getattr(self, key)]) != 1:
                    problems.append(f"mode {self.mode} needs exactly one of {' or '.join(need)}")
            elif not getattr(self, need):
                problems.append(f"mode {self.mode} needs {need}")
        usable = {"mode"}
        usable.update(
            key for need in _AUTH_REQUIRED[self.mode] for key in (need if isinstance(need, tuple) else (need,))
        )
        for key in sorted(self.model_fields_set - usable):
            if getattr(self, key) != type(self).model_fields[key].default:
                problems.append(f"{key} is not used with mode {self.mode}; remove it or change the mode")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PacsDimseConfig(_Section):
    """A PACS queried with C-FIND (Study Root); the calling AE title is dicom.ae_title."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    # The most C-FIND answers the PACS gives to one query: a window with that many is split in two.
    max_results: int = Field(default=500, ge=0)  # 0: the PACS has no limit

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _checked_ae_title(value)


class PacsConfig(_Section):
    """The PACS that ``pacs-bridge backfill`` reads studies from (docs/backfill.md)."""

    dicomweb_url: str = ""  # QIDO-RS / WADO-RS base URL (the one before /studies); empty: no DICOMweb
    auth: PacsAuthConfig = PacsAuthConfig()
    dimse: PacsDimseConfig | None = None
    # Requests go one at a time, and start at most this often; 0: no limit beyond one at a time.
    max_requests_per_second: float = Field(default=20.0, ge=0)
    timeout_seconds: float = Field(default=30.0, gt=0)
    qido_limit: int = Field(default=100, ge=1, le=10000)  # studies per QIDO-RS page
    max_response_megabytes: float = Field(default=256.0, gt=0)  # one metadata answer at most
    max_attempts: int = Field(default=5, ge=1, le=100)  # per request, when the PACS answers 429 or 503

    @field_validator("dicomweb_url")
    @classmethod
    def _check_dicomweb_url(cls, value: str) -> str:
        return _http_url(value).rstrip("/") if value else value


class Config(_Section):
    dicom: DicomConfig = DicomConfig()
    database: DatabaseConfig = DatabaseConfig()
    fhir: FhirConfig
    debounce: DebounceConfig = DebounceConfig()
    endpoints: list[EndpointConfig] = []
    patient: PatientConfig = PatientConfig()
    accession: AccessionConfig = AccessionConfig()
    site: SiteConfig = SiteConfig()
    publish: PublishConfig = PublishConfig()
    logging: LoggingConfig = LoggingConfig()
    http: HttpConfig | None = None
    pacs: PacsConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _database_section_always_validated(cls, data: Any) -> Any:
        """Without a ``database`` section the default URL is still validated, so that its relative SQLite path
        resolves against the configuration file's directory like a written one."""
        if isinstance(data, dict) and "database" not in data:
            return {**data, "database": {}}
        return data

    @property
    def quiet_period(self) -> timedelta:
        return timedelta(seconds=self.debounce.quiet_seconds)

    @property
    def max_delay(self) -> timedelta:
        return timedelta(seconds=self.debounce.max_delay_seconds)


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (list indexes skipped)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        if inner and getattr(annotation, "__origin__", None) is list:
            model = inner[0]
        elif inner and isinstance(annotation, types.UnionType):  # an optional section: SECTION | None
            model = next((arg for arg in inner if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
        else:
            model = annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        known = sorted(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys here: {', '.join(known)}"
        return f"at '{_key_path(loc)}': unknown key{suggestion}"
    if kind == "missing":
        return f"at '{_key_path(loc)}': required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    where = _key_path(loc)
    value = error.get("input")
    if kind not in ("value_error",) and not isinstance(value, dict | list):
        message += f", got {value!r}"
    return f"at '{where}': {redact_urls(message)}"


def parse_config(data: Any, *, path: str, directory: Path | None = None) -> Config:
    """Validate an already-parsed YAML document; raises ``ConfigError`` listing every problem.

    Relative paths in it resolve against ``directory`` (the file's own directory); None leaves them as written.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, [f"expected a mapping of sections at the top level, got {type(data).__name__}"])
    data, problems = _without_inline_secrets(data)
    data, pacs_problems = _without_inline_secrets(data, "pacs")
    problems += pacs_problems
    problems += _duplicate_endpoint_ids(data.get("endpoints"))
    try:
        config = Config.model_validate(data, context={_CONFIG_DIRECTORY: directory})
    except ValidationError as exc:
        raise ConfigError(path, [_describe(error) for error in exc.errors()] + problems) from exc
    problems += _profile_problems(config)
    problems += _patient_problems(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def _profile_problems(config: Config) -> list[str]:
    """IHE IMR is an R4 profile whose ImagingStudy needs an endpoint; a viewer reaches images over WADO-RS."""
    if config.fhir.profile != "ihe-imr":
        return []
    problems = []
    if config.fhir.version != "R4":
        problems.append(
            f"at 'fhir.profile': ihe-imr is an R4 profile; set fhir.version to R4 (got {config.fhir.version})"
        )
    if not any(e.connection_type == "dicom-wado-rs" and not e.is_series_level for e in config.endpoints):
        problems.append(
            "at 'endpoints': fhir.profile ihe-imr needs a study-level endpoint (no series_modalities nor "
            "series_calling_aets) of connection_type dicom-wado-rs"
        )
    for position, endpoint in enumerate(config.endpoints):
        if not endpoint.is_series_level and endpoint.connection_type not in IHE_IMR_CONNECTION_TYPES:
            problems.append(
                f"at 'endpoints[{position}].connection_type': the IHE IMR study endpoints may only be "
                f"{' or '.join(sorted(IHE_IMR_CONNECTION_TYPES))}, got {endpoint.connection_type} (endpoint "
                f"{endpoint.id}); make it series-level or remove it"
            )
    return problems


def _patient_problems(config: Config) -> list[str]:
    """lookup and create search the server by identifier system and value: without any system configured, a
    PatientID alone could match another issuer's patient, so every study would fall back to its identifier."""
    patient = config.patient
    if patient.mode == "identifier" or patient.identifier_system or patient.issuers:
        return []
    return [
        f"at 'patient.mode': {patient.mode} searches the FHIR server by identifier system and value; set "
        "patient.identifier_system (or patient.issuers), since a PatientID alone may be another issuer's patient"
    ]


def config_warnings(config: Config) -> list[str]:
    """Valid settings that may not do what the operator expects, each naming its key (check-config prints them)."""
    warnings = []
    patient = config.patient
    if patient.mode != "identifier" and not patient.issuers:
        warnings.append(
            f"at 'patient.issuers': patient.mode {patient.mode} runs without an issuers table, so only studies "
            "that name no IssuerOfPatientID are searched (in patient.identifier_system); a study naming an issuer "
            "is referenced by identifier only, never searched, linked or created. List each IssuerOfPatientID your "
            "senders use with its system (your own issuer with patient.identifier_system's value)"
        )
    accession = config.accession
    if accession.mode == "lookup" and not accession.identifier_system and not accession.issuers:
        warnings.append(
            "at 'accession.mode': lookup searches the FHIR server's ServiceRequests by identifier system and value, "
            "and neither accession.identifier_system nor accession.issuers is set, so no accession number has a "
            "system and no order is ever looked up (an accession number alone may be another issuer's order). Set "
            "accession.identifier_system (or accession.issuers), or accession.mode: identifier"
        )
    return warnings


def _without_inline_secrets(data: dict[str, Any], section: str = "fhir") -> tuple[dict[str, Any], list[str]]:
    """``data`` without secrets written inline under ``{section}.auth``, and a problem naming each one.

    They are taken out before validation so that no error (nor its cause) ever carries their value.
    """
    fhir = data.get(section)
    if not isinstance(fhir, dict) or not isinstance(fhir.get("auth"), dict):
        return data, []
    auth: dict[str, Any] = fhir["auth"]
    problems = []
    for key, instead in _INLINE_SECRET_KEYS.items():
        if key in auth:
            where = " or ".join(f"'{name}'" for name in instead)
            problems.append(
                f"at '{section}.auth.{key}': secrets are not accepted in the configuration file; name an environment "
                f"variable or a file (readable only by the bridge's user) that holds it, with {where}"
            )
    if not problems:
        return data, []
    cleaned = {key: value for key, value in auth.items() if key not in _INLINE_SECRET_KEYS}
    return {**data, section: {**fhir, "auth": cleaned}}, problems


def _duplicate_endpoint_ids(endpoints: Any) -> list[str]:
    """Two endpoints with one id would overwrite each other's Endpoint resource: name each repeat."""
    if not isinstance(endpoints, list):
        return []
    seen: set[str] = set()
    problems = []
    for position, endpoint in enumerate(endpoints):
        endpoint_id = endpoint.get("id") if isinstance(endpoint, dict) else None
        if not isinstance(endpoint_id, str):
            continue
        if endpoint_id in seen:
            problems.append(f"at 'endpoints[{position}].id': endpoint ids must be unique; repeated: {endpoint_id}")
        seen.add(endpoint_id)
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last one
    silently, so a second ``dicom:`` section would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_at: dict[Any, yaml.Mark] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat what it merges
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_at.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
            if earlier is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} appears twice in one mapping (first at line {earlier.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


# What usually causes a YAML parser message, and what to do about it.
_YAML_HINTS = (
    ("'\\t'", "YAML indents with spaces, not tabs"),
    ("expected <block end>", "check this line's indentation against the lines above it"),
    ("mapping values are not allowed here", "quote a value that contains ': ', or check the indentation"),
    ("could not find expected ':'", "each key needs ': ' after it; check the line above too"),
    ("did not find expected key", "check this line's indentation against the lines above it"),
    ("found unexpected end of stream", "close the quote, [ or { opened earlier"),
    ("appears twice", "merge the two into one, or remove one"),
)


# A value the parser reads to its end before it finds the mistake: the error is reported where the value starts
# (where the fix goes), not where the parser gave up, maybe many lines on. (parser's context, what it is, the fix)
_UNCLOSED = {
    "while scanning a quoted scalar": ("the quoted value", "close the quote"),
    "while parsing a flow sequence": ("the [ list", "close the [ list with ]"),
    "while parsing a flow mapping": ("the { mapping", "close the { mapping with }"),
}


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error as one problem: where it is (line and column, from 1), what the parser says, the line
    itself and, for common mistakes, what to do."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"not valid YAML: {exc}"
    mark = exc.problem_mark
    problem = exc.problem or "syntax error"
    context_mark = exc.context_mark
    unclosed = _UNCLOSED.get(exc.context or "")
    if unclosed is not None and context_mark is not None and context_mark.line != mark.line:
        value, fix = unclosed
        where = f"line {context_mark.line + 1}, column {context_mark.column + 1}"
        ended = "the end of the file" if problem == "found unexpected end of stream" else f"line {mark.line + 1}"
        message = f"not valid YAML at {where}: {value} that starts here runs on to {ended} ({problem})"
        return message + _quoted_line(text, context_mark.line) + f"; {fix}"
    message = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if exc.context and context_mark is not None and context_mark.line != mark.line:
        message += f" ({exc.context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    message += _quoted_line(text, mark.line)
    hint = next((hint for pattern, hint in _YAML_HINTS if pattern in problem), None)
    return f"{message}; {hint}" if hint else message


def _quoted_line(text: str, number: int) -> str:
    """Line ``number`` (from 0) of ``text`` without its comment, as "; the line reads '...'"; "" for none."""
    lines = text.splitlines()
    line = re.sub(r"\s+#.*$", "", lines[number]) if 0 <= number < len(lines) else ""
    return f"; the line reads {line.rstrip()!r}" if line.strip() else ""


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``; relative paths in it resolve against its directory."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, [f"not UTF-8 text (byte {exc.start}); save the file as UTF-8"]) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(name, [_yaml_problem(exc, text)]) from exc
    return parse_config(data, path=name, directory=Path(path).absolute().parent)
