"""HTTP for machines (stdlib ``http.server``): ``/healthz``, ``/readyz`` and ``/metrics``.

``/healthz`` answers while the process serves HTTP at all. ``/readyz`` answers 200 only when the database is
writable, the publishing scheduler ticks and the DICOM listener accepts associations, else 503 with the
reasons, so a load balancer or Prometheus alert can tell which part is down. What works but holds work back
(the FHIR server down: studies wait, nothing is lost) does not make the bridge unready: it is listed under
``degraded`` in the body of either answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from pacs_bridge.errors import LISTEN_ERRNOS, ListenError

log = structlog.get_logger("pacs_bridge.http")

ReadinessCheck = Callable[[], str | None]  # None when ready, else the reason it is not


class HealthServer:
    """Serves health and metrics on its own thread."""

    def __init__(
        self,
        *,
        bind: str,
        port: int,
        readiness_checks: dict[str, ReadinessCheck],
        render_metrics: Callable[[], bytes],
        degradation_checks: dict[str, ReadinessCheck] | None = None,
    ) -> None:
        self._checks = readiness_checks
        self._degradation_checks = degradation_checks or {}
        self._render_metrics = render_metrics
        try:
            self._server = ThreadingHTTPServer((bind, port), self._handler_class())
        except OSError as exc:
            if exc.errno not in LISTEN_ERRNOS:
                raise
            raise ListenError(service="health and metrics", key_prefix="http", bind=bind, port=port, cause=exc) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="pacs-bridge-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("http_started", port=self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def readiness(self) -> dict[str, str]:
        """Each failing check's reason, by check name; empty when ready."""
        return self._failing(self._checks)

    def degradation(self) -> dict[str, str]:
        """What works but holds work back, by check name; empty when nothing does."""
        return self._failing(self._degradation_checks)

    @staticmethod
    def _failing(checks: dict[str, ReadinessCheck]) -> dict[str, str]:
        problems: dict[str, str] = {}
        for name, check in checks.items():
            try:
                reason = check()
            except Exception as exc:  # a check that crashes reports itself as not ready
                reason = f"{type(exc).__name__}: {exc}"
            if reason:
                problems[name] = reason
        return problems

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pacs-bridge"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, "application/json", {"status": "alive"})
                elif path == "/readyz":
                    problems = server.readiness()
                    body: dict[str, Any] = (
                        {"status": "not ready", "problems": problems} if problems else {"status": "ready"}
                    )
                    degraded = server.degradation()
                    if degraded:
                        body["degraded"] = degraded
                    self._send(503 if problems else 200, "application/json", body)
                elif path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4; charset=utf-8", server._render_metrics())
                else:
                    self._send(404, "application/json", {"error": f"no such path {path}"})

            def _send(self, status: int, content_type: str, body: Any) -> None:
                payload = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the journal

        return Handler
