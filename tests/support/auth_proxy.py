"""A reverse proxy written for the tests that lets a request through to the real FHIR server only when its
``Authorization`` header passes a check, optionally over TLS (and mutual TLS).

    with AuthProxy(upstream_port=fhir.port, accept=lambda header: header == "Bearer t0ken") as proxy:
        proxy.base_url              # http://127.0.0.1:PORT/fhir
        proxy.authorizations        # the Authorization header of every request that arrived
        proxy.refused               # how many were answered 401

Refused requests get 401 with ``WWW-Authenticate: Bearer`` and an OperationOutcome; with
``echo_credentials=True`` that OperationOutcome quotes the header it got, as a careless server might, so that
tests can show the bridge keeps it out of its errors. ``tls=ServerTls(...)`` serves HTTPS; with a ``client_ca``
the handshake requires a client certificate issued by it.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.support.background_http import HOST, BackgroundHttpServer

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTls:
    certificate: Path
    key: Path
    client_ca: Path | None = None  # set: require a client certificate issued by this CA

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, self.key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.client_ca)
        return context


class AuthProxy(BackgroundHttpServer):
    def __init__(
        self,
        *,
        upstream_port: int,
        accept: Callable[[str | None], bool] = lambda header: True,
        tls: ServerTls | None = None,
        echo_credentials: bool = False,
    ) -> None:
        self._upstream_port = upstream_port
        self._accept = accept
        self._tls = tls
        super().__init__()
        self._echo = echo_credentials
        self._lock = threading.Lock()
        self.authorizations: list[str | None] = []
        self.refused = 0

    def start(self) -> AuthProxy:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                header = self.headers.get("Authorization")
                with owner._lock:
                    owner.authorizations.append(header)
                if not owner._accept(header):
                    with owner._lock:
                        owner.refused += 1
                    self._refuse(header)
                    return
                status, headers, payload = owner._forward(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _refuse(self, header: str | None) -> None:
                text = "missing, expired or wrong credentials"
                if owner._echo:
                    text += f" (got Authorization: {header})"
                outcome = {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "login", "diagnostics": text}],
                }
                payload = json.dumps(outcome).encode()
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="fhir"')
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests assert on owner.authorizations

        self._serve(Handler, name="auth-proxy", ssl_context=self._tls.context() if self._tls is not None else None)
        return self

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, bytes]:
        upstream = http.client.HTTPConnection(HOST, self._upstream_port, timeout=30)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP | {"authorization"}}
            upstream.request(method, path, body=body, headers=forwarded)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            upstream.close()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the proxy is not started"
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{HOST}:{self._server.server_address[1]}/fhir"
