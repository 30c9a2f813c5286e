"""The ``dicom`` section (the C-STORE listener, its calling AE rules and TLS) and the ``database`` section (the
index)."""

from __future__ import annotations

import os
import re
import ssl
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pacs_bridge.config.base import (
    ConfigFilePath,
    _checked_ae_title,
    _config_directory,
    _readable_file,
    _Section,
    sqlite_url_against,
)
from pacs_bridge.dicom.access import CallingAeRule, parse_network
from pacs_bridge.dicom.header import DEFAULT_MAX_INFLATED_BYTES
from pacs_bridge.index.engine import normalized_database_url
from pacs_bridge.redaction import redact_url, redact_urls


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


def _no_key_password() -> bytes:
    """The passphrase OpenSSL asks for an encrypted key: none (it would otherwise ask on the terminal)."""
    return b""


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
        # The files exist (field validators); loading them here lets check-config and the start name the keys
        # when they are not a certificate with its key, rather than the start failing on OpenSSL's words alone.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if self.certificate:
            try:
                context.load_cert_chain(self.certificate, self.private_key, password=_no_key_password)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"certificate '{self.certificate}' and private_key '{self.private_key}' cannot be loaded as a "
                    f"PEM certificate (chain) and its unencrypted private key ({exc}); check that the key matches "
                    "the certificate and is not protected by a passphrase"
                ) from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"client_ca '{self.client_ca}' cannot be loaded as PEM CA certificates ({exc})"
                ) from None
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


# ``dicom.listener_processes: auto`` runs one listener process per usable core up to this many: the number
# docs/performance.md measures. One association is served by one process whatever the number.
AUTO_LISTENER_PROCESSES = 2


def usable_cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as systemd's CPUAffinity= or a container sets
    it), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class DicomConfig(_Section):
    ae_title: str = "PACS_BRIDGE"
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1, le=1000)
    # Connections whose A-ASSOCIATE-RQ is not yet whole; one more closes the oldest. They hold no thread.
    max_pending_connections: int = Field(default=256, ge=1, le=100_000)
    # Processes that serve associations; the main process accepts and hands each connection to the one with the
    # most room left. max_associations and max_pending_connections are shared among them exactly. auto: see
    # listener_process_count.
    listener_processes: int | Literal["auto"] = "auto"
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
    # auto: DIMSE messages other than C-STORE and C-ECHO answered 0x0211 or ignored (dicom/message_screen) with
    # the pynetdicom release it supports; off: pynetdicom dispatches every message itself.
    message_screen: Literal["auto", "off"] = "auto"
    # On SIGTERM: how long open associations may go on before they are aborted (the sender re-sends).
    shutdown_drain_seconds: float = Field(default=30.0, ge=0, le=3600)
    # A deflated dataset inflating to more is refused (0xC000); it is inflated as a stream, never held whole.
    max_inflated_bytes: int = Field(default=DEFAULT_MAX_INFLATED_BYTES, ge=1)
    # Empty: any calling AE. Entries: an AE title, or {ae_title, addresses} to pin it to source addresses.
    allowed_calling_aets: list[AllowedCallingAeConfig] = []
    tls: DicomTlsConfig = DicomTlsConfig()

    @property
    def listener_process_count(self) -> int:
        """How many listener processes run: the number configured, or for ``auto`` one per CPU core this process
        may run on, at most ``AUTO_LISTENER_PROCESSES``; never more than ``max_associations`` (each process
        serves a share of them, and a process with none would serve nothing)."""
        if self.listener_processes == "auto":
            wanted = min(usable_cpu_cores(), AUTO_LISTENER_PROCESSES)
        else:
            wanted = self.listener_processes
        return max(1, min(wanted, self.max_associations))

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _checked_ae_title(value)

    @field_validator("listener_processes", mode="before")
    @classmethod
    def _check_listener_processes(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
            return value
        raise ValueError(f"expected auto or a whole number of processes from 1 to 64, got {value!r}")

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
