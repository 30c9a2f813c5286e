"""A TCP relay on 127.0.0.1 that slows a sender down: what the client sends reaches the server at a set rate.

    with PacedRelay(upstream_port=bridge.port, bytes_per_second=500_000) as relay:
        storescu(relay.port, files)     # the same send, taking as long as its bytes need at that rate

A send through it lasts at least ``bytes sent / bytes_per_second`` seconds on any machine (a slower machine only
makes it longer), which is what a test of "a transfer still going on when X happens" needs. The server's
answers go back unpaced; when either side closes, both are closed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

_SLICE_SECONDS = 0.01


class PacedRelay:
    def __init__(self, *, upstream_port: int, bytes_per_second: int) -> None:
        self._upstream_port = upstream_port
        self._slice = max(1, int(bytes_per_second * _SLICE_SECONDS))
        self._listening = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    @property
    def port(self) -> int:
        return int(self._listening.getsockname()[1])

    def __enter__(self) -> PacedRelay:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._listening.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _address = self._listening.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            self._spawn(self._forward, client, server, True)
            self._spawn(self._forward, server, client, False)

    def _forward(self, source: socket.socket, target: socket.socket, paced: bool) -> None:
        next_slice = time.monotonic()
        try:
            while not self._stop.is_set():
                data = source.recv(self._slice if paced else 65536)
                if not data:
                    break
                target.sendall(data)
                if paced:
                    next_slice += _SLICE_SECONDS
                    delay = next_slice - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    else:
                        next_slice = time.monotonic()
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
