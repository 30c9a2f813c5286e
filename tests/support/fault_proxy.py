"""Fault-injecting proxies written for the tests: put one between the bridge and a real server.

``HttpFaultProxy`` forwards HTTP/1.1 requests to an upstream (the real FHIR test server) and answers each
request with the next programmed fault, or passes it through::

    with HttpFaultProxy(upstream_port=fhir.port) as proxy:
        proxy.program(Respond(503, retry_after="2"), Pass(), Reset(), Slow(3))  # the next four requests
        proxy.program(Respond(500), methods={"PUT"})  # the next PUT; other requests pass (or get the outage's)
        proxy.outage(Respond(503))   # every request until proxy.restore()
        proxy.refuse()               # close the listening socket: connections are refused
        proxy.restore()              # pass everything through again (re-listening on the same port)
        proxy.requests               # what arrived, when, and what it got

Every connection gets its own daemon thread; one HTTP request per connection (the proxy answers with
``Connection: close``), so a fault always lands on a fresh request.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer with this status (and ``Retry-After`` if given) without contacting the upstream."""

    status: int
    retry_after: str | None = None
    body: str = ""

    @property
    def name(self) -> str:
        return f"{self.status}" + (f" Retry-After: {self.retry_after}" if self.retry_after is not None else "")


@dataclass(frozen=True, slots=True)
class Reset:
    """Forward the request (the upstream applies it), relay part of the answer, then reset the connection."""

    name: str = "reset"


@dataclass(frozen=True, slots=True)
class Slow:
    """Hold the request for ``seconds`` (beyond the client's timeout), then forward it anyway."""

    seconds: float

    @property
    def name(self) -> str:
        return f"slow {self.seconds:g} s"


@dataclass(frozen=True, slots=True)
class Pass:
    """Forward this request untouched (a gap in a programmed sequence)."""

    name: str = "passed"


Fault = Respond | Reset | Slow | Pass


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    method: str
    path: str
    at: float  # time.monotonic() when the request had fully arrived
    fault: str  # the fault's name, or "passed"


class _Listener:
    """A listening socket on 127.0.0.1 that can be closed and re-opened on the same port."""

    def __init__(self, handle: Callable[[socket.socket], None], *, port: int = 0) -> None:
        self._handle = handle
        self.port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        if self._sock is not None:
            return
        sock = socket.create_server((HOST, self.port))  # SO_REUSEADDR: re-binding after close() works
        sock.settimeout(0.1)  # so the accept loop notices close()
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True, name="proxy-accept")
        self._thread.start()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._thread is not None:
            self._thread.join(timeout=5)  # the accept loop sees _sock change within its 0.1 s timeout
        sock.close()  # closed after the loop left accept(), never under it

    def _accept_loop(self, sock: socket.socket) -> None:
        while self._sock is sock:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            conn.settimeout(None)
            threading.Thread(target=self._handle, args=(conn,), daemon=True, name="proxy-conn").start()


def _reset(conn: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): the peer sees "connection reset by peer"."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _read_request(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 request as (head, body), or None when the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body


def _closing_head(head: bytes) -> bytes:
    """The request head with ``Connection: close``, so the upstream ends its answer by closing."""
    lines = [
        line
        for line in head.split(b"\r\n")
        if line.partition(b":")[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([*lines, b"Connection: close"])


class HttpFaultProxy:
    """An HTTP/1.1 proxy in front of ``upstream_host:upstream_port`` that injects programmed faults."""

    def __init__(self, *, upstream_port: int, upstream_host: str = HOST) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._programmed: list[tuple[Fault, frozenset[str] | None]] = []  # (fault, methods it is for)
        self._standing: Fault | None = None
        self._stopped = threading.Event()
        self._requests: list[ProxiedRequest] = []
        self._listener = _Listener(self._serve)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> HttpFaultProxy:
        self._listener.open()
        return self

    def stop(self) -> None:
        self._stopped.set()  # wakes Slow faults
        self._listener.close()

    def __enter__(self) -> HttpFaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def root_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # ---- programming -----------------------------------------------------------------------------------------
    def program(self, *faults: Fault, methods: Collection[str] | None = None) -> None:
        """The next requests get these faults, one each, in order; later ones pass (or get the outage's).

        ``methods``: only requests with one of these methods take the faults (e.g. the bridge's PUTs, not its
        ``GET metadata`` probes, which then pass or get the outage's fault).
        """
        only = frozenset(methods) if methods is not None else None
        with self._lock:
            self._programmed.extend((fault, only) for fault in faults)

    def outage(self, fault: Fault) -> None:
        """Every request gets ``fault`` until ``restore()``."""
        with self._lock:
            self._standing = fault
        self._listener.open()

    def refuse(self) -> None:
        """Stop listening: connection attempts are refused until ``restore()``."""
        self._listener.close()

    def restore(self) -> None:
        """End the outage: listen again on the same port and pass requests through."""
        with self._lock:
            self._standing = None
            self._programmed.clear()
        self._listener.open()

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    def _next_fault(self, method: str) -> Fault | None:
        with self._lock:
            for position, (fault, methods) in enumerate(self._programmed):
                if methods is None or method in methods:
                    del self._programmed[position]
                    return fault
            return self._standing

    # ---- serving ---------------------------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn)
        except OSError:
            conn.close()
            return
        if request is None:
            conn.close()
            return
        head, body = request
        method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
        fault = self._next_fault(method)
        with self._lock:
            self._requests.append(ProxiedRequest(method, path, time.monotonic(), fault.name if fault else "passed"))
        try:
            if isinstance(fault, Respond):
                self._respond(conn, fault)
            elif isinstance(fault, Reset):
                answer = self._forward(head, body)
                conn.sendall(answer[: max(len(answer) // 2, 1)])
                _reset(conn)
                return
            else:
                if isinstance(fault, Slow) and self._stopped.wait(fault.seconds):
                    _reset(conn)
                    return
                conn.sendall(self._forward(head, body))
        except OSError:
            pass  # the client gave up (e.g. its timeout): nothing to answer
        conn.close()

    @staticmethod
    def _respond(conn: socket.socket, fault: Respond) -> None:
        body = fault.body.encode("utf-8")
        lines = [f"HTTP/1.1 {fault.status} Injected", f"Content-Length: {len(body)}", "Connection: close"]
        if fault.retry_after is not None:
            lines.append(f"Retry-After: {fault.retry_after}")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send the request upstream and return its whole answer (the upstream closes after it)."""
        with socket.create_connection(self._upstream, timeout=60) as upstream:
            upstream.sendall(_closing_head(head) + b"\r\n\r\n" + body)
            chunks = []
            while chunk := upstream.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)
