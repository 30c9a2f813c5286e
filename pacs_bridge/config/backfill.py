"""The ``pacs`` section: the PACS ``pacs-bridge backfill`` reads studies from (DICOMweb, C-FIND)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pacs_bridge.config.base import (
    _ENV_NAME,
    ConfigFilePath,
    _auth_key_problems,
    _checked_ae_title,
    _http_url,
    _Section,
)


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
        problems = _auth_key_problems(self, self.mode)
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
