"""``Config``, the whole configuration, with the ``http`` and ``logging`` sections."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, model_validator

from pacs_bridge.config.backfill import PacsConfig
from pacs_bridge.config.base import _Section
from pacs_bridge.config.listener import DatabaseConfig, DicomConfig
from pacs_bridge.config.publishing import (
    AccessionConfig,
    DebounceConfig,
    EndpointConfig,
    FhirConfig,
    PatientConfig,
    PublishConfig,
    SiteConfig,
)


class HttpConfig(_Section):
    """Health and metrics endpoints; the section is off when absent."""

    bind: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


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
