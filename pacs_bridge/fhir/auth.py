"""How the bridge proves who it is to the FHIR server: TLS settings and ``httpx.Auth`` flows.

Part of the FHIR adapter (it owns httpx with ``fhir/client``). Modes:

- ``bearer``: a static token in ``Authorization: Bearer``;
- ``basic``: username and password;
- ``oauth2_client_credentials``: a token from the token endpoint (RFC 6749 section 4.4), client id + secret;
- ``smart_backend_services``: a token obtained with a ``private_key_jwt`` client assertion signed with RS384 or
  ES384 (HL7 SMART App Launch, Backend Services).

Tokens are cached until shortly before they expire and fetched again when the FHIR server answers 401 (the
request is then sent once more). Secrets are read from environment variables or files named in the
configuration, never from the YAML itself, and never appear in logs, reprs or error messages: token endpoint
errors are redacted, and ``fhir/client`` redacts the ``Authorization`` credentials from server answers.

A token that cannot be obtained raises ``PublishError``: retryable when the endpoint is unreachable or answers
408, 429 or 5xx (the study stays pending), not retryable when it refuses the client (any other 4xx, e.g. 400
``invalid_client`` or 401): that is a configuration error the operator must fix.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pacs_bridge.errors import PacsBridgeError, PublishError

AuthMode = Literal["none", "bearer", "basic", "oauth2_client_credentials", "smart_backend_services"]
Algorithm = Literal["RS384", "ES384"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp must be no more than five minutes in the future.
ASSERTION_LIFETIME_SECONDS = 240
# A cached token is replaced this long before it expires (at most half its lifetime), so that a request never
# leaves with a token that dies on the way.
EXPIRY_MARGIN_SECONDS = 30.0
REDACTED = "[redacted]"
MAX_DETAIL_CHARS = 500
RETRYABLE_STATUSES = frozenset({408, 429})


class CredentialsError(PacsBridgeError):
    """A FHIR credential or TLS file named in the configuration cannot be used; the message names the key and
    what to fix (set the environment variable, make the file readable by the bridge's user, or correct it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretSource:
    """Where a secret lives: an environment variable or a file (exactly one). ``key`` is its configuration key
    (``fhir.auth.password``), for messages."""

    key: str
    env: str = ""
    file: str = ""

    def read(self) -> str:
        """The secret, stripped of surrounding whitespace; ``CredentialsError`` if it is missing or empty."""
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise CredentialsError(
                    f"{self.key}_env names the environment variable {self.env}, which is not set for the bridge; "
                    f"set it (systemd: Environment= or EnvironmentFile= in a drop-in readable by root only), "
                    f"or use {self.key}_file"
                )
            where = f"the environment variable {self.env} ({self.key}_env)"
        elif self.file:
            try:
                value = Path(self.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                raise CredentialsError(
                    f"cannot read {self.key}_file {self.file}: {reason}; create it as UTF-8 text readable by the "
                    f"bridge's user (and nobody else)"
                ) from None
            where = f"the file {self.file} ({self.key}_file)"
        else:
            raise CredentialsError(f"{self.key}: set {self.key}_env or {self.key}_file")
        value = value.strip()
        if not value:
            raise CredentialsError(f"{where} is empty; put the secret for {self.key} there")
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    ca_bundle: str = ""  # PEM file of the CAs to trust instead of the default store; empty: the default store
    client_certificate: str = ""  # PEM certificate (chain) for mutual TLS; empty: none
    client_key: str = ""  # PEM private key of client_certificate; empty: it is in the certificate file


def make_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The TLS context for the FHIR server and the token endpoint: verification always on; ``CredentialsError``
    naming the key when a file cannot be loaded."""
    if tls.ca_bundle:
        try:
            context = ssl.create_default_context(cafile=tls.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(
                f"cannot load fhir.tls.ca_bundle {tls.ca_bundle}: {_reason(exc)}; it must be a readable file of "
                "PEM certificates (-----BEGIN CERTIFICATE-----)"
            ) from None
    else:
        context = httpx.create_ssl_context()  # certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR when set
    if tls.client_certificate:
        try:
            context.load_cert_chain(tls.client_certificate, tls.client_key or None)
        except (OSError, ssl.SSLError) as exc:
            key = f" and fhir.tls.client_key {tls.client_key}" if tls.client_key else ""
            raise CredentialsError(
                f"cannot load fhir.tls.client_certificate {tls.client_certificate}{key}: {_reason(exc)}; they "
                "must be readable PEM files, the key unencrypted and matching the certificate"
            ) from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """The ``fhir.auth`` section as plain values (secrets as sources, read by ``make_auth``)."""

    mode: AuthMode = "none"
    token: SecretSource | None = None  # bearer
    username: str = ""  # basic
    password: SecretSource | None = None  # basic
    token_url: str = ""  # oauth2_client_credentials, smart_backend_services
    client_id: str = ""
    client_secret: SecretSource | None = None  # oauth2_client_credentials
    client_auth_method: ClientAuthMethod = "client_secret_basic"
    scope: str = ""
    private_key_file: str = ""  # smart_backend_services
    algorithm: Algorithm = "RS384"
    kid: str = ""


def make_auth(
    settings: AuthSettings,
    *,
    token_http: httpx.Client,
    monotonic: Callable[[], float] = time.monotonic,
) -> SecretAuth | None:
    """The ``httpx.Auth`` for ``settings`` (``None`` for mode ``none``), its secrets read now.

    ``token_http`` sends token requests (its own client, without this auth, sharing the TLS context).
    Raises ``CredentialsError`` when a secret or the private key cannot be read.
    """
    if settings.mode == "none":
        return None
    if settings.mode == "bearer":
        return BearerAuth(_required(settings.token, "fhir.auth.token").read())
    if settings.mode == "basic":
        return BasicAuth(settings.username, _required(settings.password, "fhir.auth.password").read())
    if settings.mode == "oauth2_client_credentials":
        return ClientCredentialsAuth(
            token_http,
            token_url=settings.token_url,
            client_id=settings.client_id,
            client_secret=_required(settings.client_secret, "fhir.auth.client_secret").read(),
            method=settings.client_auth_method,
            scope=settings.scope,
            monotonic=monotonic,
        )
    return BackendServicesAuth(
        token_http,
        token_url=settings.token_url,
        client_id=settings.client_id,
        private_key=load_private_key(settings.private_key_file, settings.algorithm),
        algorithm=settings.algorithm,
        kid=settings.kid,
        scope=settings.scope,
        monotonic=monotonic,
    )


def _required(source: SecretSource | None, key: str) -> SecretSource:
    return source if source is not None else SecretSource(key=key)


def load_private_key(path: str, algorithm: Algorithm) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The unencrypted PEM private key at ``path``, checked to suit ``algorithm`` (RSA for RS384, P-384 for
    ES384); ``CredentialsError`` otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise CredentialsError(
            f"cannot read fhir.auth.private_key_file {path}: {exc.strerror or exc}; make it readable by the "
            "bridge's user (and nobody else)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"fhir.auth.private_key_file {path} is not an unencrypted PEM private key ({type(exc).__name__}); "
            "write it with: openssl pkcs8 -topk8 -nocrypt"
        ) from None
    if algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CredentialsError(f"fhir.auth.private_key_file {path}: an RS384 key needs at least 2048 bits")
        return key
    if algorithm == "ES384" and isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise CredentialsError(
                f"fhir.auth.private_key_file {path}: ES384 needs a P-384 (secp384r1) key, not {key.curve.name}"
            )
        return key
    wanted = "an RSA" if algorithm == "RS384" else "a P-384 EC"
    if isinstance(key, rsa.RSAPrivateKey):
        held = "an RSA key (use RS384)"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        held = f"an EC key on {key.curve.name}" + (" (use ES384)" if isinstance(key.curve, ec.SECP384R1) else "")
    else:
        held = f"a {type(key).__name__} key"
    raise CredentialsError(
        f"fhir.auth.algorithm {algorithm} needs {wanted} private key, and fhir.auth.private_key_file {path} holds "
        f"{held}; change the algorithm or the key"
    )


class SecretAuth(httpx.Auth):
    """An auth flow that knows its secrets, so that whatever reports an error can leave them out."""

    def secrets(self) -> Iterable[str]:
        return ()

    def redact(self, text: str) -> str:
        """``text`` with every secret this auth holds replaced by ``[redacted]``."""
        for secret in self.secrets():
            if secret:
                text = text.replace(secret, REDACTED)
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(...)"


class BearerAuth(SecretAuth):
    """A static token (``fhir.auth.mode: bearer``)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def secrets(self) -> Iterable[str]:
        return (self._token,)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class BasicAuth(SecretAuth):
    """HTTP Basic with username and password (``fhir.auth.mode: basic``)."""

    def __init__(self, username: str, password: str) -> None:
        self._password = password
        credentials = f"{username}:{password}".encode()
        self._header = f"Basic {base64.b64encode(credentials).decode('ascii')}"

    def secrets(self) -> Iterable[str]:
        return (self._password, self._header.removeprefix("Basic "))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


@dataclass(slots=True)
class _Token:
    value: str
    refresh_at: float | None  # monotonic time after which it is fetched again; None: until a 401


class TokenAuth(SecretAuth):
    """An access token from an OAuth 2.0 token endpoint, cached until shortly before it expires and fetched
    again when the FHIR server answers 401 (that request is then sent once more with the new token).

    Thread-safe: one token request at a time, shared by every request.
    """

    def __init__(
        self, http: httpx.Client, *, token_url: str, scope: str, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._http = http
        self.token_url = token_url
        self._scope = scope
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._seen: list[str] = []  # the last access tokens held, so that errors can leave them out

    def secrets(self) -> Iterable[str]:
        return tuple(self._seen)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._current_token(stale=None)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._current_token(stale=token)}"
            yield request

    def _current_token(self, *, stale: str | None) -> str:
        """The cached token, or a new one if there is none, it is due for refresh, or it is ``stale`` (the
        server refused it; another thread may already have replaced it)."""
        with self._lock:
            token = self._token
            now = self._monotonic()
            if token is None or token.value == stale or (token.refresh_at is not None and now >= token.refresh_at):
                token = self._token = self._fetch(now)
            return token.value

    def _form(self) -> tuple[dict[str, str], dict[str, str]]:
        """The token request's form fields and extra headers."""
        raise NotImplementedError

    def _fetch(self, now: float) -> _Token:
        data, headers = self._form()
        if self._scope:
            data["scope"] = self._scope
        try:
            response = self._http.post(self.token_url, data=data, headers={"Accept": "application/json", **headers})
        except httpx.TimeoutException as exc:
            raise PublishError(
                f"no answer from the token endpoint {self.token_url} in time ({type(exc).__name__})", retryable=True
            ) from None
        except httpx.TransportError as exc:
            raise PublishError(
                f"cannot reach the token endpoint {self.token_url}: {type(exc).__name__}: {self.redact(str(exc))}",
                retryable=True,
            ) from None
        status = response.status_code
        if not response.is_success:
            retryable = status in RETRYABLE_STATUSES or status >= 500
            advice = (
                "; will retry"
                if retryable
                else "; check fhir.auth (token_url, client_id, scope and the client's secret or key) and its "
                "registration at the authorization server, then run pacs-bridge retry --failed"
            )
            raise PublishError(
                f"the token endpoint {self.token_url} refused the request: {self._error_text(response)}{advice}",
                retryable=retryable,
                http_status=status,
            )
        try:
            body: Any = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        value = body.get("access_token") if isinstance(body, dict) else None
        token_type = str(body.get("token_type", "bearer")) if isinstance(body, dict) else ""
        if not isinstance(value, str) or not value or token_type.lower() != "bearer":
            raise PublishError(
                f"the token endpoint {self.token_url} answered {status} without a bearer access_token",
                retryable=True,
                http_status=status,
            )
        self._seen = [*self._seen[-7:], value]
        lifetime = _seconds(body.get("expires_in"))
        if lifetime is None:  # RFC 6749 only recommends expires_in: keep the token until the server refuses it
            return _Token(value, None)
        return _Token(value, now + lifetime - min(EXPIRY_MARGIN_SECONDS, lifetime / 2))

    def _error_text(self, response: httpx.Response) -> str:
        """RFC 6749 ``error`` and ``error_description``, else the start of the body; secrets left out."""
        try:
            body: Any = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            description = body.get("error_description")
            text = f"{body['error']}: {description}" if isinstance(description, str) else body["error"]
        else:
            text = response.text.strip() or response.reason_phrase
        return f"HTTP {response.status_code} {self.redact(text)[:MAX_DETAIL_CHARS]}"


def _seconds(value: Any) -> float | None:
    """A positive ``expires_in`` (a number, or digits as some servers send it), else ``None``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


class ClientCredentialsAuth(TokenAuth):
    """OAuth 2.0 client credentials grant with a client secret (``oauth2_client_credentials``)."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        method: ClientAuthMethod = "client_secret_basic",
        scope: str = "",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(http, token_url=token_url, scope=scope, monotonic=monotonic)
        self._client_id = client_id
        self._client_secret = client_secret
        self._method = method

    def secrets(self) -> Iterable[str]:
        return (*super().secrets(), self._client_secret, *self._basic_credentials())

    def _basic_credentials(self) -> tuple[str, ...]:
        # RFC 6749 section 2.3.1: each part form-urlencoded before base64.
        pair = f"{_form_encode(self._client_id)}:{_form_encode(self._client_secret)}"
        return (base64.b64encode(pair.encode()).decode("ascii"),)

    def _form(self) -> tuple[dict[str, str], dict[str, str]]:
        data = {"grant_type": "client_credentials"}
        if self._method == "client_secret_post":
            return {**data, "client_id": self._client_id, "client_secret": self._client_secret}, {}
        return data, {"Authorization": f"Basic {self._basic_credentials()[0]}"}


def _form_encode(value: str) -> str:
    return quote_plus(value)


class BackendServicesAuth(TokenAuth):
    """SMART Backend Services: client credentials with a ``private_key_jwt`` assertion (RS384 or ES384)."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        token_url: str,
        client_id: str,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        algorithm: Algorithm = "RS384",
        kid: str = "",
        scope: str = "",
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(http, token_url=token_url, scope=scope, monotonic=monotonic)
        self._client_id = client_id
        self._private_key = private_key
        self._algorithm = algorithm
        self._kid = kid
        self._wall_clock = wall_clock

    def client_assertion(self) -> str:
        """A fresh signed JWT: iss = sub = client id, aud = the token endpoint, a random jti, exp in 4 minutes."""
        now = int(self._wall_clock())
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self.token_url,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
        }
        headers = {"typ": "JWT", **({"kid": self._kid} if self._kid else {})}
        return jwt.encode(claims, self._private_key, algorithm=self._algorithm, headers=headers)

    def _form(self) -> tuple[dict[str, str], dict[str, str]]:
        return {
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }, {}
