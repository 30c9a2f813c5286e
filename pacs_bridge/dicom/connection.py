"""The socket every association is served on: it sees each byte pynetdicom (or the fast path) reads.

``GuardedSocket`` (plain TCP) and ``GuardedSSLSocket`` (DICOM TLS) are sockets of their own class, handed to
pynetdicom through socketserver's public ``process_request``; whatever reads them, stock pynetdicom or the fast
path (dicom/fastpath), gets these guarantees, because they hold in ``recv`` and ``recv_into`` themselves:

- **A deadline for each PDU.** From its first byte, a PDU must be whole within ``pdu_timeout`` seconds, however
  its bytes trickle in; past it the read fails (``TimeoutError``), which pynetdicom treats as the connection
  closing. Between PDUs, pynetdicom's own network timeout (``dicom.network_timeout_seconds``) applies.
- **The stream is checked as it arrives** (dicom/pdu_stream.py): a PDU over its limit, an item that does not
  fit, a data set fragment on another presentation context than its command. The peer gets an A-ABORT
  (PS3.8 9.3.8, source: service provider) and the connection is closed; the read fails with
  ``ConnectionAbortedError``.
- **A data set over ``max_instance_bytes`` is read and dropped.** Once a data set passes the limit, the
  P-DATA-TF PDUs that carry only more of it are read here and never handed on; the one with its last fragment
  is. pynetdicom (or the fast path) thus completes the message with a truncated data set that is still over
  the limit, the C-STORE handler refuses it by its size, and the association goes on. Memory and disk stay
  bounded by the limit plus a PDU. To see a PDU whole before handing it on, it is held here and served from
  memory, within the one read of that PDU (header, then body) that pynetdicom or the fast path makes.
- **Immediate ACKs.** Many senders leave Nagle's algorithm on (Debian's DCMTK, Orthanc, pynetdicom itself):
  they hold the last small segment of a C-STORE until the previous one is acknowledged, while Linux delays its
  ACK by up to 40 ms, so each C-STORE would stall ~80 ms. ``TCP_QUICKACK`` is armed again after every
  receive (Linux clears it once used), and ``TCP_NODELAY`` sends our responses at once.
- **Activity**, for the stop: a connection is ``in_transfer`` while a PDU or message is partly received, while
  a received data set awaits its answer (nothing sent since its last fragment: a C-STORE being indexed), and
  for ``RECENTLY_ACTIVE_SECONDS`` after anything was received. **Closing** is reported once (``on_close``).
- **Nothing before the answer.** A requestor waits for the answer to its A-ASSOCIATE-RQ (PS3.8 9.2, Sta5):
  a byte that follows the request before anything was sent gets an A-ABORT at once, instead of pynetdicom
  waiting, with the association's thread and slot, for the rest of a PDU that would be aborted anyway.
- **The last word.** Once an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT is sent, every read ends at once as if
  the peer had closed the connection (dicom/final_answer.py): a refused peer cannot hold a thread and an
  association slot by sending more.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from pacs_bridge.dicom.final_answer import SentPdus
from pacs_bridge.dicom.pdu_stream import A_ASSOCIATE_RQ, P_DATA_TF, PDU_HEADER, PduStreamMonitor, PeerProtocolError

log = structlog.get_logger("pacs_bridge.dicom")

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)  # Linux only
_TIMEOUT_SLACK = 1.0  # the socket timeout is adjusted only when it is off by more than this many seconds
# An association is in the middle of a transfer when a PDU or message is partly received, a C-STORE is being
# handled, or it received something this recently (a sender between two PDUs of one message).
RECENTLY_ACTIVE_SECONDS = 1.0
_A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02"  # A-ABORT, source 2 (service provider); the reason follows
_BEFORE_THE_ANSWER = "a PDU sent before the answer to the association request (PS3.8 9.2: the requestor waits)"
_ABORT_REASONS = {"unknown_pdu_type": 0x01, "message_out_of_order": 0x02}  # else 0x06 invalid PDU parameter


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    pdu_timeout_seconds: float = 30.0
    max_pdu_bytes: int = 256 * 1024
    max_instance_bytes: int = 4 * 1024**3


class _Guard:
    """The state and rules shared by both socket classes; see the module docstring."""

    __slots__ = (
        "_answered",
        "_awaits_answer",
        "_closed",
        "_held",
        "_held_position",
        "_last_received_at",
        "_limits",
        "_on_close",
        "_pdu_deadline",
        "_quickack",
        "_sent_pdus",
        "_spoken",
        "_timeout",
        "monitor",
        "peer",
        "violation",
    )

    def __init__(self, limits: ConnectionLimits, *, peer: str, on_close: Callable[[], None] | None) -> None:
        self._limits = limits
        self.monitor = PduStreamMonitor(
            max_pdu_bytes=limits.max_pdu_bytes, max_instance_bytes=limits.max_instance_bytes
        )
        self.peer = peer
        self._on_close = on_close
        self._closed = False
        self._held = b""
        self._held_position = 0
        self._pdu_deadline = 0.0
        self._timeout = -1.0  # what settimeout was last given; -1: not yet
        self._last_received_at = time.monotonic()
        self._quickack = bool(_TCP_QUICKACK)
        self._answered = 0  # data sets received before the last send
        self._sent_pdus = SentPdus()
        self._spoken = False  # whether anything was sent yet
        self._awaits_answer: bool | None = None  # whether the first PDU received is an A-ASSOCIATE-RQ
        self.violation: PeerProtocolError | None = None

    # ---- what the listener asks ---------------------------------------------------------------------------
    def in_transfer(self, now: float) -> bool:
        monitor = self.monitor
        return (
            monitor.in_message
            or monitor.data_sets_received > self._answered
            or now - self._last_received_at < RECENTLY_ACTIVE_SECONDS
        )

    @property
    def is_closed(self) -> bool:
        return self._closed

    def sent(self) -> None:
        """Something goes out: whatever data set was received is answered."""
        self._answered = self.monitor.data_sets_received
        self._spoken = True

    def went_out(self, data: Any) -> None:
        """``data`` was sent (after what was sent before)."""
        self._sent_pdus.sent(data)

    @property
    def said_last_word(self) -> bool:
        """Whether an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT was sent: nothing more is read (final_answer.py)."""
        return self._sent_pdus.last_word is not None

    def has_held(self) -> int:
        return len(self._held) - self._held_position

    def closed(self) -> None:
        if not self._closed:
            self._closed = True
            if self._on_close is not None:
                self._on_close()

    # ---- reading ----------------------------------------------------------------------------------------
    def recv(self, sock: socket.socket, raw_recv: Callable[[int, int], bytes], bufsize: int, flags: int) -> bytes:
        if self.violation is not None:
            raise ConnectionAbortedError(str(self.violation))
        if self.said_last_word:
            return b""
        if self._held or (self.monitor.discarding and self.monitor.at_pdu_boundary):
            return self._take_held(sock, raw_recv, bufsize, flags)
        self._arm_timeout(sock)
        data = raw_recv(bufsize, flags)
        if not flags & socket.MSG_PEEK:
            self._received(sock, data)
            if self.said_last_word:  # the A-ABORT for what was just received: it is not handed on
                return b""
        return data

    def recv_into(
        self,
        sock: socket.socket,
        raw_recv: Callable[[int, int], bytes],
        raw_recv_into: Callable[[Any, int, int], int],
        buffer: Any,
        nbytes: int,
        flags: int,
    ) -> int:
        if self.violation is not None:
            raise ConnectionAbortedError(str(self.violation))
        if self.said_last_word:
            return 0
        view = memoryview(buffer).cast("B")
        wanted = nbytes or len(view)
        if self._held or (self.monitor.discarding and self.monitor.at_pdu_boundary):
            data = self._take_held(sock, raw_recv, wanted, flags)
            view[: len(data)] = data
            return len(data)
        self._arm_timeout(sock)
        count = raw_recv_into(view, wanted, flags)
        if not flags & socket.MSG_PEEK:
            self._received(sock, view[:count])
            if self.said_last_word:
                return 0
        return count

    def hold(self, sock: socket.socket, data: bytes) -> None:
        """Serve ``data`` (already read from the connection, e.g. a TLS peer's A-ASSOCIATE-RQ) before anything
        else."""
        self._received(sock, data)
        self._held = self._held[self._held_position :] + data
        self._held_position = 0

    def _arm_timeout(self, sock: socket.socket) -> None:
        if self.monitor.at_pdu_boundary:
            wanted = self._limits.pdu_timeout_seconds
        else:
            wanted = self._pdu_deadline - time.monotonic()
            if wanted <= 0:
                self._fail(sock, PeerProtocolError("pdu_timeout", self._deadline_text()))
        if abs(wanted - self._timeout) > _TIMEOUT_SLACK:
            sock.settimeout(wanted)
            self._timeout = wanted

    def _abort(self, sock: socket.socket, error: PeerProtocolError) -> None:
        """Send the A-ABORT for ``error`` (not for a stalled PDU) and shut the connection down: from then on its
        reads end as if the peer had closed it."""
        log.warning("connection_cut", peer=self.peer, reason=error.reason, detail=str(error))
        if error.reason != "pdu_timeout":  # a peer that stalls mid-PDU would not read it either
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(1.0)
                sock.sendall(_A_ABORT + bytes([_ABORT_REASONS.get(error.reason, 0x06)]))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _deadline_text(self) -> str:
        return f"a PDU not complete within dicom.pdu_timeout_seconds ({self._limits.pdu_timeout_seconds:g} s)"

    def _received(self, sock: socket.socket, data: bytes | memoryview) -> None:
        if not data:
            return
        now = time.monotonic()
        self._last_received_at = now
        monitor = self.monitor
        started = monitor.at_pdu_boundary
        before = monitor.pdus_received
        try:
            monitor.feed(data)
        except PeerProtocolError as error:
            self._fail(sock, error)
        if self._awaits_answer is None:
            self._awaits_answer = data[0] == A_ASSOCIATE_RQ
        if (
            self._awaits_answer
            and not self._spoken
            and (monitor.pdus_received > 1 or (monitor.pdus_received and not monitor.at_pdu_boundary))
        ):
            self._abort(sock, PeerProtocolError("message_out_of_order", _BEFORE_THE_ANSWER))
        if not monitor.at_pdu_boundary and (started or monitor.pdus_received != before):
            self._pdu_deadline = now + self._limits.pdu_timeout_seconds
        if self._quickack:
            try:  # noqa: SIM105 - on every receive; a try costs less than contextlib.suppress
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:  # the peer may be gone; the next read reports that
                pass

    def _take_held(self, sock: socket.socket, raw_recv: Callable[[int, int], bytes], bufsize: int, flags: int) -> bytes:
        if not self.has_held():
            self._hold_next_pdu(sock, raw_recv)
        start = self._held_position
        data = self._held[start : start + bufsize]
        if not flags & socket.MSG_PEEK:
            self._held_position += len(data)
            if self._held_position == len(self._held):
                self._held, self._held_position = b"", 0
        return data

    def _hold_next_pdu(self, sock: socket.socket, raw_recv: Callable[[int, int], bytes]) -> None:
        """Read whole PDUs, dropping those that carry only more of a data set over the limit, until one to hand
        on; hold it."""
        while True:
            self._pdu_deadline = time.monotonic() + self._limits.pdu_timeout_seconds
            header = self._read_exactly(sock, raw_recv, PDU_HEADER.size)
            self._received(sock, header)  # checks the type and length before the body is read
            pdu_type, _reserved, length = PDU_HEADER.unpack(header)
            body = self._read_exactly(sock, raw_recv, length)
            self._received(sock, body)
            if pdu_type == P_DATA_TF and self.monitor.discarding:
                continue
            self._held, self._held_position = header + body, 0
            return

    def _read_exactly(self, sock: socket.socket, raw_recv: Callable[[int, int], bytes], count: int) -> bytes:
        parts: list[bytes] = []
        missing = count
        while missing:
            remaining = self._pdu_deadline - time.monotonic()
            if remaining <= 0:
                self._fail(sock, PeerProtocolError("pdu_timeout", self._deadline_text()))
            sock.settimeout(remaining)
            self._timeout = remaining
            part = raw_recv(min(missing, 1 << 20), 0)
            if not part:
                raise ConnectionResetError(f"the peer closed the connection {count - missing} bytes into {count}")
            parts.append(part)
            missing -= len(part)
        return b"".join(parts)

    def _fail(self, sock: socket.socket, error: PeerProtocolError) -> None:
        """Abort the association (A-ABORT, then close) for ``error``, and fail the read."""
        self.violation = error
        self._abort(sock, error)
        if error.reason == "pdu_timeout":
            raise TimeoutError(str(error)) from error
        raise ConnectionAbortedError(str(error)) from error


def _no_delay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedSocket(socket.socket):
    """A plain TCP connection served to pynetdicom; see the module docstring."""

    _guard: _Guard

    @classmethod
    def adopt(
        cls,
        sock: socket.socket,
        limits: ConnectionLimits,
        *,
        peer: str,
        on_close: Callable[[], None] | None = None,
    ) -> GuardedSocket:
        """``sock``'s connection as a ``GuardedSocket`` (``sock`` itself is detached and must not be used)."""
        guarded = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded._guard = _Guard(limits, peer=peer, on_close=on_close)
        guarded.setblocking(True)
        _no_delay(guarded)
        return guarded

    @property
    def guard(self) -> _Guard:
        return self._guard

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        return self._guard.recv(self, super().recv, bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        return self._guard.recv_into(self, super().recv, super().recv_into, buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0, /) -> int:
        self._guard.sent()
        count = super().send(data, flags)
        self._guard.went_out(memoryview(data)[:count])
        return count

    def sendall(self, data: Any, flags: int = 0, /) -> None:
        self._guard.sent()
        super().sendall(data, flags)
        self._guard.went_out(data)

    def cut(self) -> None:
        """End the connection now (both directions), whatever is being read or written."""
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._guard.closed()


class GuardedSSLSocket(ssl.SSLSocket):
    """A DICOM TLS connection served to pynetdicom; see the module docstring. Made by an ``SSLContext`` whose
    ``sslsocket_class`` it is (``FrontDoor`` sets that); ``setup`` must follow before it is read."""

    _guard: _Guard

    def setup(self, limits: ConnectionLimits, *, peer: str, on_close: Callable[[], None] | None = None) -> None:
        self._guard = _Guard(limits, peer=peer, on_close=on_close)
        _no_delay(self)

    @property
    def guard(self) -> _Guard:
        return self._guard

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        return self._guard.recv(self, super().recv, buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        return self._guard.recv_into(self, super().recv, super().recv_into, buffer, nbytes or 0, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.sent()
        count = super().send(data, flags)
        if guard is not None:
            guard.went_out(memoryview(data)[:count])
        return count

    def sendall(self, data: Any, flags: int = 0) -> None:
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.sent()
        super().sendall(data, flags)
        if guard is not None:
            guard.went_out(data)

    def pending(self) -> int:
        # pynetdicom reads a TLS socket when select() says so or when it holds decrypted bytes: held ones count.
        guard = getattr(self, "_guard", None)
        held = guard.has_held() if guard is not None else 0
        return held + super().pending()

    def cut(self) -> None:
        # socket's own shutdown: SSLSocket's would drop its SSL object under a thread that may be reading it
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self, socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            super().close()
        finally:
            guard = getattr(self, "_guard", None)
            if guard is not None:
                guard.closed()


Guarded = GuardedSocket | GuardedSSLSocket
