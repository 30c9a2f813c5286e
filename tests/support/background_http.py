"""An HTTP server on 127.0.0.1 that serves on a daemon thread: the lifecycle shared by the test services."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"


class BackgroundHttpServer:
    """Subclasses define ``start()`` (building their handler, then calling ``_serve``); ``stop()`` and the
    context manager are shared."""

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def _serve(
        self, handler: type[BaseHTTPRequestHandler], *, name: str, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Bind a free port on 127.0.0.1 (wrapped in TLS when ``ssl_context`` is given) and start serving."""
        self._server = ThreadingHTTPServer((HOST, 0), handler)
        self._server.daemon_threads = True
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
