"""The YAML configuration file -> validated, typed settings.

Every problem is collected and reported with its key path (``fhir.base_url: …``); unknown keys get a
did-you-mean hint; a YAML syntax error or a repeated key is reported with its line and column. Relative paths
in the file (the SQLite file of ``database.url``, TLS and secret files) are relative to the file's own
directory, so every command finds the same files whatever its working directory. Only the composition
modules (``service``, ``wiring``, ``listener_processes``, ``cli``, ``checks``, ``backfill/command``) read
``Config``; everything else receives plain values.

``base`` holds what every section shares; ``listener`` the ``dicom`` and ``database`` sections, ``publishing``
those of publishing, ``backfill`` the ``pacs`` section, ``model`` the whole ``Config``, ``loading`` the file
read and validated.
"""

from pacs_bridge.config.backfill import PacsAuthConfig, PacsConfig, PacsDimseConfig
from pacs_bridge.config.base import ConfigFilePath, sqlite_url_against
from pacs_bridge.config.listener import AllowedCallingAeConfig, DatabaseConfig, DicomConfig, DicomTlsConfig
from pacs_bridge.config.loading import config_warnings, load_config, parse_config
from pacs_bridge.config.model import Config, HttpConfig, LoggingConfig
from pacs_bridge.config.publishing import (
    AccessionConfig,
    DebounceConfig,
    EndpointConfig,
    FhirAuthConfig,
    FhirConfig,
    FhirTlsConfig,
    PatientConfig,
    PublishConfig,
    SiteConfig,
)

__all__ = [
    "AccessionConfig",
    "AllowedCallingAeConfig",
    "Config",
    "ConfigFilePath",
    "DatabaseConfig",
    "DebounceConfig",
    "DicomConfig",
    "DicomTlsConfig",
    "EndpointConfig",
    "FhirAuthConfig",
    "FhirConfig",
    "FhirTlsConfig",
    "HttpConfig",
    "LoggingConfig",
    "PacsAuthConfig",
    "PacsConfig",
    "PacsDimseConfig",
    "PatientConfig",
    "PublishConfig",
    "SiteConfig",
    "config_warnings",
    "load_config",
    "parse_config",
    "sqlite_url_against",
]
