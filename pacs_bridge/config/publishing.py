"""The sections of publishing: ``fhir`` (the server, its TLS and auth), ``debounce``, ``endpoints``, ``patient``,
``accession``, ``site`` and ``publish``."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from pacs_bridge.config.base import (
    _ENV_NAME,
    _FHIR_ID,
    ConfigFilePath,
    _auth_key_problems,
    _checked_ae_title,
    _http_url,
    _Section,
)
from pacs_bridge.fhir.accession import AccessionMode
from pacs_bridge.fhir.endpoint import CONNECTION_TYPES
from pacs_bridge.fhir.patient import PatientMode
from pacs_bridge.redaction import redact_url


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
        problems = _auth_key_problems(self, self.mode)
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
