"""An OAuth 2.0 token endpoint written for the tests (stdlib ``http.server`` on 127.0.0.1).

It checks what a real authorization server checks, and issues short random bearer tokens:

- client credentials with a secret (``client_secret_basic`` or ``client_secret_post``);
- SMART Backend Services: a ``private_key_jwt`` assertion whose signature is verified with the client's public
  key (RS384 or ES384), with iss = sub = client id, aud = this endpoint, exp at most five minutes ahead and a
  jti never seen before.

    with TokenServer(secrets={"bridge": "s3cret"}) as tokens:
        tokens.token_url                     # http://127.0.0.1:PORT/token
        tokens.is_valid(token)               # issued, not expired, not revoked (the auth proxy asks this)
        tokens.requests                      # token requests received (granted or not)
        tokens.revoke_all()                  # every issued token becomes invalid (a 401 follows)
        tokens.program(503)                  # answer the next request with this status
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from tests.support.background_http import HOST, BackgroundHttpServer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class OAuthRefusal(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


@dataclass(slots=True)
class TokenRequest:
    form: dict[str, str]
    client_id: str | None
    granted: bool
    jwt_header: dict[str, Any] = field(default_factory=dict)


class TokenServer(BackgroundHttpServer):
    """The token endpoint on a free port; see the module docstring."""

    def __init__(
        self,
        *,
        secrets: dict[str, str] | None = None,
        public_keys: dict[str, PublicKeyTypes] | None = None,
        expires_in: int = 300,
    ) -> None:
        super().__init__()
        self._secrets = dict(secrets or {})
        self._public_keys = dict(public_keys or {})
        self.expires_in = expires_in
        self._lock = threading.Lock()
        self._issued: dict[str, float] = {}  # token -> monotonic expiry
        self._jtis: set[str] = set()
        self._programmed: list[int] = []
        self.requests: list[TokenRequest] = []

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> TokenServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8")
                status, answer = owner._answer(self.path, self.headers.get("Authorization"), body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests assert on owner.requests

        self._serve(Handler, name="token-server")
        return self

    @property
    def token_url(self) -> str:
        assert self._server is not None, "the token server is not started"
        return f"http://{HOST}:{self._server.server_address[1]}/token"

    # ---- what the tests use ------------------------------------------------------------------------------------
    def is_valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    def revoke_all(self) -> None:
        with self._lock:
            self._issued.clear()

    def program(self, *statuses: int) -> None:
        with self._lock:
            self._programmed.extend(statuses)

    @property
    def granted(self) -> int:
        """How many tokens were issued."""
        return sum(1 for request in self.requests if request.granted)

    # ---- the endpoint ------------------------------------------------------------------------------------------
    def _answer(self, path: str, authorization: str | None, body: str) -> tuple[int, dict[str, Any]]:
        form = {key: values[0] for key, values in parse_qs(body, keep_blank_values=True).items()}
        request = TokenRequest(form=form, client_id=None, granted=False)
        with self._lock:
            self.requests.append(request)
            programmed = self._programmed.pop(0) if self._programmed else None
        if programmed is not None:
            return programmed, {"error": "temporarily_unavailable", "error_description": "programmed failure"}
        try:
            if path != "/token":
                raise OAuthRefusal(404, "not_found", f"no token endpoint at {path}")
            if form.get("grant_type") != "client_credentials":
                raise OAuthRefusal(400, "unsupported_grant_type", f"grant_type {form.get('grant_type')!r}")
            if "client_assertion" in form:
                request.client_id, request.jwt_header = self._check_assertion(form)
            else:
                request.client_id = self._check_secret(form, authorization)
        except OAuthRefusal as refusal:
            return refusal.status, {"error": refusal.error, "error_description": refusal.description}
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._issued[token] = time.monotonic() + self.expires_in
        request.granted = True
        answer: dict[str, Any] = {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}
        if "scope" in form:
            answer["scope"] = form["scope"]
        return 200, answer

    def _check_secret(self, form: dict[str, str], authorization: str | None) -> str:
        if authorization and authorization.startswith("Basic "):
            decoded = base64.b64decode(authorization.removeprefix("Basic ")).decode()
            client_id, _, secret = decoded.partition(":")
            client_id, secret = unquote_plus(client_id), unquote_plus(secret)
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if not client_id or self._secrets.get(client_id) != secret:
            raise OAuthRefusal(401, "invalid_client", "client authentication failed")
        return client_id

    def _check_assertion(self, form: dict[str, str]) -> tuple[str, dict[str, Any]]:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthRefusal(400, "invalid_request", f"client_assertion_type {form.get('client_assertion_type')!r}")
        assertion = form["client_assertion"]
        header = jwt.get_unverified_header(assertion)
        client_id = jwt.decode(assertion, options={"verify_signature": False}).get("iss", "")
        key = self._public_keys.get(client_id)
        if key is None:
            raise OAuthRefusal(401, "invalid_client", f"unknown client {client_id!r}")
        try:
            claims = jwt.decode(
                assertion,
                key,  # type: ignore[arg-type]
                algorithms=["RS384", "ES384"],
                audience=self.token_url,
                issuer=client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.InvalidTokenError as exc:
            raise OAuthRefusal(401, "invalid_client", f"client assertion rejected: {exc}") from exc
        if claims["sub"] != client_id:
            raise OAuthRefusal(401, "invalid_client", "sub differs from iss")
        if claims["exp"] > time.time() + 300 + 5:
            raise OAuthRefusal(400, "invalid_grant", "exp more than five minutes ahead")
        with self._lock:
            if claims["jti"] in self._jtis:
                raise OAuthRefusal(400, "invalid_grant", "jti already used")
            self._jtis.add(claims["jti"])
        return client_id, header
