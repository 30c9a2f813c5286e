"""The FHIR REST adapter: PUT resources over an injected ``httpx.Client`` and classify what went wrong.

Retryable (the study stays pending and is sent again with backoff): transport errors and timeouts, 408, 429
and 5xx, with the server's ``Retry-After`` passed on. Any other 4xx is a refusal that will not pass by
itself; its OperationOutcome text becomes the error the operator sees.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.resource import FhirResource

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUSES = frozenset({408, 429})
MAX_DETAIL_CHARS = 2000
# A Retry-After beyond a day is a server error, not a plan: wait a day at most.
MAX_RETRY_AFTER_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PutResult:
    http_status: int
    version_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateResult:
    http_status: int  # 201: created; 200: a conditional create found the resource and wrote nothing
    # The id from the body, else from Location / Content-Location; None when the server stated neither.
    resource_id: str | None


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); ``None`` if absent or bad."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_SECONDS)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER_SECONDS)


def operation_outcome_text(response: httpx.Response) -> str:
    """The human-readable text of an OperationOutcome body, else the start of the body."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = (issue.get("details") or {}).get("text") or issue.get("diagnostics") or issue.get("code", "")
            where = ", ".join(issue.get("expression") or issue.get("location") or [])
            parts.append(f"{text} (at {where})" if where else str(text))
        if parts:
            return "; ".join(parts)[:MAX_DETAIL_CHARS]
    return response.text[:MAX_DETAIL_CHARS] or response.reason_phrase


class FhirClient:
    """PUTs resources to one FHIR server base URL."""

    def __init__(self, http: httpx.Client, *, base_url: str) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")

    @property
    def base_url(self) -> str:
        return self._base_url

    def read(self, resource_type: str, resource_id: str) -> tuple[FhirResource, str | None] | None:
        """The current version of a resource and its version id; None when absent or deleted (404, 410).

        Raises ``PublishError`` (classified like a PUT's) on any other failure.
        """
        try:
            response = self._exchange("GET", f"{self._base_url}/{resource_type}/{resource_id}")
        except PublishError as exc:
            if exc.http_status in (404, 410):
                return None
            raise
        resource: FhirResource = response.json()
        return resource, _version_id(response) or (resource.get("meta") or {}).get("versionId")

    def put(self, resource: FhirResource, *, if_match: str | None = None) -> PutResult:
        """Create or update ``resource`` at ``{base}/{type}/{id}``; raises ``PublishError`` on failure.

        ``if_match``: the version id the server must still hold, else it answers 412 and writes nothing.
        """
        url = f"{self._base_url}/{resource['resourceType']}/{resource['id']}"
        headers = {}
        if if_match is not None:
            headers["If-Match"] = f'W/"{if_match}"'
        response = self._write("PUT", url, resource, headers)
        return PutResult(http_status=response.status_code, version_id=_version_id(response))

    def create(self, resource: FhirResource, *, if_none_exist: str | None = None) -> CreateResult:
        """POST ``resource`` to ``{base}/{type}`` for the server to assign its id; raises ``PublishError``.

        ``if_none_exist``: a search query (``identifier=system%7Cvalue``) making it a conditional create: when one
        resource matches, the server answers 200 and writes nothing; several give 412. The id comes from the body
        when the server returns the resource, else from ``Location`` or ``Content-Location``.
        """
        resource_type = str(resource["resourceType"])
        headers = {"If-None-Exist": if_none_exist} if if_none_exist is not None else {}
        response = self._write("POST", f"{self._base_url}/{resource_type}", resource, headers)
        return CreateResult(http_status=response.status_code, resource_id=_created_id(response, resource_type))

    def _write(self, method: str, url: str, resource: FhirResource, extra_headers: dict[str, str]) -> httpx.Response:
        """Send ``resource`` as the body; a failure raises ``PublishError`` (retryable or not)."""
        body = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **extra_headers}
        try:
            response = self._http.request(method, url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise PublishError(f"no answer from {url} in time ({type(exc).__name__})", retryable=True) from exc
        except httpx.TransportError as exc:
            raise PublishError(
                f"cannot reach {url}: {type(exc).__name__}: {exc}{_tls_hint(exc)}", retryable=True
            ) from exc
        if response.is_success:
            return response
        status = response.status_code
        retryable = status in RETRYABLE_STATUSES or status >= 500
        detail = redact_credentials(operation_outcome_text(response), response.request.headers.get("Authorization"))
        if status in (401, 403):
            detail += (
                f"; the server refused the bridge's credentials ({status}): check fhir.auth and the client's "
                "rights on the server, then run pacs-bridge retry --failed"
            )
        raise PublishError(
            detail,
            retryable=retryable,
            http_status=status,
            retry_after_seconds=parse_retry_after(response.headers.get("Retry-After"), now=datetime.now(UTC)),
        )

    def search(
        self, resource_type: str, params: dict[str, str], *, in_body: bool = False, limit: int | None = None
    ) -> list[FhirResource]:
        """The resources a search matches (every page followed); raises ``PublishError`` on failure.

        ``in_body``: ``POST {type}/_search`` with the parameters as a form, so they stay out of URLs (and so out
        of proxy and access logs): for searches by patient identifier. ``limit``: at most this many entries are
        returned, and no further page is read once they are there.
        """
        url = f"{self._base_url}/{resource_type}"
        query = {"_count": "100", **params}
        if in_body:
            response = self._exchange("POST", f"{url}/_search", data=query)
        else:
            response = self._exchange("GET", url, params=query)
        found: list[FhirResource] = []
        while True:
            bundle = response.json()
            found += [entry["resource"] for entry in bundle.get("entry") or [] if "resource" in entry]
            if limit is not None and len(found) >= limit:
                return found[:limit]
            next_url = next((link["url"] for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
            if next_url is None:
                return found
            response = self._exchange("GET", next_url)  # a next link carries its own query

    def delete(self, resource_type: str, resource_id: str) -> None:
        """Delete one resource; a resource already gone is not an error."""
        try:
            self._exchange("DELETE", f"{self._base_url}/{resource_type}/{resource_id}")
        except PublishError as exc:
            if exc.http_status not in (404, 410):
                raise

    def probe(self) -> None:
        """GET ``[base]/metadata``: returns when the server answers it, raises ``PublishError`` otherwise."""
        self._exchange("GET", f"{self._base_url}/metadata")

    def _exchange(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; failures raise ``PublishError`` classified like PUTs (retryable or not)."""
        try:
            response = self._http.request(method, url, headers={"Accept": FHIR_JSON}, **kwargs)
        except httpx.TimeoutException as exc:
            raise PublishError(f"no answer from {url} in time ({type(exc).__name__})", retryable=True) from exc
        except httpx.TransportError as exc:
            raise PublishError(f"cannot reach {url}: {type(exc).__name__}: {exc}", retryable=True) from exc
        if response.is_success:
            return response
        status = response.status_code
        raise PublishError(
            operation_outcome_text(response),
            retryable=status in RETRYABLE_STATUSES or status >= 500,
            http_status=status,
            retry_after_seconds=parse_retry_after(response.headers.get("Retry-After"), now=datetime.now(UTC)),
        )


def redact_credentials(text: str, authorization: str | None) -> str:
    """``text`` without the credentials of the ``Authorization`` header sent (a server may echo them back)."""
    if not authorization:
        return text
    scheme, _, credentials = authorization.partition(" ")
    secrets = [credentials.strip()]
    if scheme.lower() == "basic":
        # Not valid base64 or UTF-8: not ours to decode, and the raw credentials are redacted anyway.
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            secrets.append(base64.b64decode(secrets[0], validate=True).decode("utf-8").partition(":")[2])
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _tls_hint(exc: httpx.TransportError) -> str:
    """What to check when the TLS handshake failed (the cause is an ``ssl`` error)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "; the server's certificate is not trusted: if it comes from a private CA, set fhir.tls.ca_bundle"
    if isinstance(cause, ssl.SSLError) or "SSL" in str(exc):
        return (
            "; the TLS handshake failed: check fhir.tls (client_certificate and client_key if the server "
            "requires a client certificate)"
        )
    return ""


def _created_id(response: httpx.Response, resource_type: str) -> str | None:
    """The id of the resource a create answered with: its body when that is the resource (a server may return an
    OperationOutcome, or no body with ``Prefer: return=minimal``), else ``Location`` / ``Content-Location``."""
    try:
        body: Any = response.json() if response.content else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and body.get("resourceType") == resource_type and isinstance(body.get("id"), str):
        return str(body["id"])
    pattern = re.compile(rf"(?:^|/){resource_type}/([A-Za-z0-9\-.]{{1,64}})(?:/_history/[^/]*)?/?$")
    for header in ("Location", "Content-Location"):
        match = pattern.search(response.headers.get(header, "").split("?")[0])
        if match:
            return match.group(1)
    return None


def _version_id(response: httpx.Response) -> str | None:
    etag = str(response.headers.get("ETag", ""))
    if etag.startswith('W/"') and etag.endswith('"'):
        return etag[3:-1]
    return etag.strip('"') or None
