"""``check-config --online``: can this configuration reach what it names? Each check says what it tried."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError

from pacs_bridge.config import Config
from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.identifier import identifier_search
from pacs_bridge.index.engine import make_engine, sqlite_file
from pacs_bridge.index.schema import head_revision
from pacs_bridge.redaction import redact_url

# The FHIR release each fhir.version expects in the server's CapabilityStatement.fhirVersion.
FHIR_RELEASE_PREFIX = {"R4": "4.0.", "R5": "5.0."}


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def check_database(config: Config) -> CheckResult:
    """Connect to ``database.url`` and read the schema revision, changing nothing (an SQLite file that does not
    exist yet is not opened, which would create it: its directory is checked instead)."""
    path = sqlite_file(config.database.url)
    if path is not None and not os.path.exists(path):
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            return CheckResult(name="database", ok=False, detail=f"{path}: the directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            return CheckResult(
                name="database", ok=False, detail=f"{path}: this user may not create files in {directory}"
            )
        return CheckResult(name="database", ok=True, detail=f"{path}: no index yet; run creates it at its first start")
    engine = make_engine(config.database.url)
    where = redact_url(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            if not inspect(connection).has_table("studies"):
                return CheckResult(name="database", ok=True, detail=f"{where}: reachable, empty (created on first run)")
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        return CheckResult(
            name="database", ok=False, detail=f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        )
    finally:
        engine.dispose()
    head = head_revision()
    if current == head:
        return CheckResult(name="database", ok=True, detail=f"{where}: reachable, schema at revision {head}")
    return CheckResult(
        name="database",
        ok=False,
        detail=f"{where}: schema at revision {current or 'unversioned'}, this pacs-bridge needs {head}: "
        "back it up, then run pacs-bridge migrate",
    )


def check_fhir_server(config: Config, http: httpx.Client) -> CheckResult:
    """GET ``{fhir.base_url}/metadata`` with the bridge's own HTTP client (TLS and auth as configured)."""
    url = redact_url(f"{config.fhir.base_url}/metadata")  # as printed
    try:
        response = http.get(f"{config.fhir.base_url}/metadata", headers={"Accept": "application/fhir+json"})
    except httpx.HTTPError as exc:
        return CheckResult(name="fhir", ok=False, detail=f"GET {url}: {type(exc).__name__}: {exc}")
    except PublishError as exc:  # no token from fhir.auth.token_url (the auth flow fetches one first)
        return CheckResult(name="fhir", ok=False, detail=f"GET {url}: {exc}")
    if not response.is_success:
        return CheckResult(name="fhir", ok=False, detail=f"GET {url}: HTTP {response.status_code}")
    try:
        capability = response.json()
    except ValueError:
        return CheckResult(name="fhir", ok=False, detail=f"GET {url}: the answer is not JSON")
    if not isinstance(capability, dict) or capability.get("resourceType") != "CapabilityStatement":
        return CheckResult(name="fhir", ok=False, detail=f"GET {url}: the answer is not a CapabilityStatement")
    release = str(capability.get("fhirVersion", ""))
    expected = FHIR_RELEASE_PREFIX[config.fhir.version]
    if not release.startswith(expected):
        return CheckResult(
            name="fhir",
            ok=False,
            detail=f"GET {url}: the server speaks FHIR {release or '(unstated)'}, "
            f"but fhir.version is {config.fhir.version}",
        )
    detail = f"GET {url}: CapabilityStatement, FHIR {release}"
    if config.fhir.auth.mode in ("oauth2_client_credentials", "smart_backend_services"):
        detail += f"; token obtained from {redact_url(config.fhir.auth.token_url)}"
    return CheckResult(name="fhir", ok=True, detail=detail)


# An identifier no Patient or ServiceRequest has: the probe searches must answer, and should match nothing.
PROBE_PATIENT_ID = "pacs-bridge-check-config-probe"


def check_patient_search(config: Config, http: httpx.Client) -> CheckResult | None:
    """With ``patient.mode`` lookup or create, search Patients by identifier the way the bridge does (``POST
    Patient/_search``), so a client without read access to Patient fails here rather than at the first study.
    Creating is not tried: it would write. None when the mode needs no search."""
    if config.patient.mode not in ("lookup", "create"):
        return None
    system = config.patient.identifier_system or next(iter(config.patient.issuers.values()), "")
    result = _search_probe(config, http, "Patient", system, what=f"patient.mode {config.patient.mode}")
    if result.ok and config.patient.mode == "create":
        return CheckResult(
            name=result.name, ok=True, detail=f"{result.detail}; creating Patients is not tried (it would write)"
        )
    return result


def check_order_search(config: Config, http: httpx.Client) -> CheckResult | None:
    """With ``accession.mode`` lookup, search ServiceRequests by identifier the way the bridge does (``POST
    ServiceRequest/_search``). None when the mode needs no search, or when no accession system is configured
    (then no order is ever searched: check-config warns about that)."""
    accession = config.accession
    system = accession.identifier_system or next(iter(accession.issuers.values()), "")
    if accession.mode != "lookup" or not system:
        return None
    return _search_probe(config, http, "ServiceRequest", system, what="accession.mode lookup")


_CHECK_NAMES = {"Patient": "patient", "ServiceRequest": "order"}


def _search_probe(config: Config, http: httpx.Client, resource_type: str, system: str, *, what: str) -> CheckResult:
    """One search by a probe identifier no resource has, escaped as the bridge sends it: it must answer."""
    name = _CHECK_NAMES[resource_type]
    search = identifier_search({"system": system, "value": PROBE_PATIENT_ID})
    url = redact_url(f"{config.fhir.base_url}/{resource_type}/_search")
    try:
        matches = FhirClient(http, base_url=config.fhir.base_url).search(
            resource_type, {"identifier": search or ""}, in_body=True
        )
    except PublishError as exc:
        hint = ""
        if exc.http_status in (401, 403):
            hint = f"; {what} needs the client to be allowed to search {resource_type}s"
        return CheckResult(name=name, ok=False, detail=f"POST {url}: {exc}{hint}")
    return CheckResult(
        name=name, ok=True, detail=f"POST {url} by identifier: answered ({len(matches)} matches for a probe identifier)"
    )
