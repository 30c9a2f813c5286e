"""The listener's front door: accepting connections, and holding them until their association request is whole.

One thread with one selector does both, without a thread per connection:

- **Accepting** (when it owns the listening socket; with ``dicom.listener_processes`` above 1 the main process
  accepts and each listener process's front door is handed the connections through ``admit``). When the
  process is out of file descriptors (EMFILE and the like), the oldest pending connection is closed to make
  room; with none pending, accepting pauses (0.05 s, doubling up to 1 s) instead of spinning on a listening
  socket that stays readable, and the pause is logged (at most once a minute), with what to raise.
- **The pending stage.** A new connection is a pending one until its A-ASSOCIATE-RQ is whole in the kernel's
  receive buffer (looked at with ``FIONREAD`` and ``MSG_PEEK``, never read): only then is it handed to
  pynetdicom (``deliver``), which reads the request at once and never waits on a half-sent one. Each pending
  connection has a deadline, the ARTIM timer of PS3.8 9.1.5 (``association_request_timeout_seconds``), and
  there are at most ``max_pending_connections``: a new one beyond that closes the oldest. So half-open
  connections cost a file descriptor each, hold no thread and no association slot, and cannot keep a real
  sender (whose request arrives within milliseconds) out. A first PDU that is not an A-ASSOCIATE-RQ is
  answered with an A-ABORT, one over ``MAX_ASSOCIATION_PDU_BYTES`` too; a request longer than what the socket
  buffers by default gets a larger receive buffer (up to the kernel's ``net.core.rmem_max``).
- **DICOM TLS.** The handshake runs here, non-blocking, within the same deadline; the request is then read
  (TLS bytes cannot be peeked at) and held by the ``GuardedSSLSocket``, which serves it to pynetdicom first.

While a request is incomplete its connection is not watched for readability (that would wake the loop for
every byte a trickling peer sends) but looked at again after 2 ms, doubling up to 100 ms.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import heapq
import itertools
import queue
import select
import selectors
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from pacs_bridge.dicom.acceptor import Acceptor, Address
from pacs_bridge.dicom.connection import ConnectionLimits, Guarded, GuardedSocket, GuardedSSLSocket
from pacs_bridge.dicom.negotiation import RequestRefusal, check_association_request
from pacs_bridge.dicom.pdu_stream import A_ABORT, A_ASSOCIATE_RQ, MAX_ASSOCIATION_PDU_BYTES, PDU_HEADER

log = structlog.get_logger("pacs_bridge.dicom")

_FIRST_RECHECK_SECONDS = 0.002
_LAST_RECHECK_SECONDS = 0.1
_LONGEST_WAIT_SECONDS = 1.0
_REPORT_EVERY_SECONDS = 10.0
_DEFAULT_BUFFERED_BYTES = 48 * 1024  # a request longer than this gets a larger receive buffer first
_LISTENING, _WAKER = object(), object()
_A_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02"  # source 2 (service provider); the reason follows
_UNRECOGNIZED_PDU, _UNEXPECTED_PDU, _INVALID_PARAMETER = 0x01, 0x02, 0x06


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontDoorSettings:
    max_pending_connections: int = 256
    association_request_timeout_seconds: float = 30.0
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)


class _Pending:
    """A connection whose association request is not yet whole."""

    __slots__ = ("address", "backoff", "buffer", "deadline", "handshaking", "request_length", "sock", "watched")

    def __init__(self, sock: socket.socket, address: Address, deadline: float, *, tls: bool) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.handshaking = tls
        self.buffer = bytearray()  # TLS: what was read of the request
        self.request_length: int | None = None  # from its PDU header, once seen
        self.backoff = _FIRST_RECHECK_SECONDS
        self.watched = 0  # selector events it is registered for (0: not registered)

    @property
    def peer(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class _Dropped(Exception):
    """A pending connection is closed, for ``reason``."""

    def __init__(self, reason: str, abort_reason: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort_reason = abort_reason


def _readable_bytes(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux


def _peer_has_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed its side, even with bytes of it still unread (Linux; elsewhere False)."""
    if not _POLLRDHUP:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _POLLRDHUP)
    return bool(poller.poll(0))


class FrontDoor:
    """Accepts connections (or is handed them) and delivers each once its association request is whole."""

    def __init__(
        self,
        settings: FrontDoorSettings,
        *,
        deliver: Callable[[Guarded, Address], None],
        listening: socket.socket | None = None,
        tls: ssl.SSLContext | None = None,
        on_connection_closed: Callable[[], None] | None = None,
        on_tick: Callable[[float], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_refused = on_refused  # told the reason (observe.ASSOCIATION_REFUSAL_REASONS) of each refusal
        self._on_tick = on_tick
        self._deliver = deliver
        self._listening = listening
        self._tls = tls
        if tls is not None:
            tls.sslsocket_class = GuardedSSLSocket  # the listener's own context: its sockets are guarded
        self._on_connection_closed = on_connection_closed
        self._selector = selectors.DefaultSelector()
        self._waker_read, self._waker_write = socket.socketpair()
        self._waker_read.setblocking(False)
        self._waker_write.setblocking(False)
        self._admitted: queue.SimpleQueue[tuple[socket.socket, Address]] = queue.SimpleQueue()
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._rechecks: list[tuple[float, int, _Pending]] = []
        self._sequence = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._acceptor = Acceptor(listening, make_room=self._make_room) if listening is not None else None
        self._closed_by_reason: collections.Counter[str] = collections.Counter()
        self._next_report = 0.0
        self.pending_closed_at_stop = 0

    # ---- interface ---------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._listening.getsockname()[1]) if self._listening is not None else 0

    @property
    def is_accepting(self) -> bool:
        thread = self._thread
        alive = thread is not None and thread.is_alive() and not self._stopping.is_set()
        return alive and (self._listening is None or self._listening.fileno() != -1)

    @property
    def pending_connections(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._selector.register(self._waker_read, selectors.EVENT_READ, _WAKER)
        if self._listening is not None:
            self._listening.setblocking(False)
            self._selector.register(self._listening, selectors.EVENT_READ, _LISTENING)
        self._next_report = time.monotonic() + _REPORT_EVERY_SECONDS
        self._thread = threading.Thread(target=self._run, name="pacs-bridge-front-door", daemon=True)
        self._thread.start()

    def admit(self, sock: socket.socket, address: Address) -> None:
        """Take a connection accepted elsewhere (thread-safe)."""
        if self._stopping.is_set():
            sock.close()
            self._connection_closed()
            return
        self._admitted.put((sock, address))
        self._wake()

    def stop(self) -> None:
        """Stop accepting and close every pending connection at once."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join()
        else:
            self._close_everything()

    # ---- the loop ----------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._waker_write.send(b"\0")

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._turn()
                except Exception:  # a bug of ours: logged, and the door stays open (at most one turn a second)
                    log.exception("front_door_failed")
                    self._stopping.wait(_LONGEST_WAIT_SECONDS)
        finally:
            self._close_everything()

    def _turn(self) -> None:
        """One turn of the loop: wait for something to do, do it, then what is due."""
        events = self._selector.select(self._wait_seconds(time.monotonic()))
        for key, mask in events:
            if key.data is _LISTENING:
                self._accept()
            elif key.data is _WAKER:
                self._take_admitted()
            else:
                self._advance(key.data, mask)
        now = time.monotonic()
        self._expire(now)
        self._recheck(now)
        self._resume_accepting(now)
        self._report(now)
        if self._on_tick is not None:
            self._on_tick(now)

    def _wait_seconds(self, now: float) -> float:
        wake_at = now + _LONGEST_WAIT_SECONDS
        if self._pending:
            wake_at = min(wake_at, next(iter(self._pending.values())).deadline)
        if self._rechecks:
            wake_at = min(wake_at, self._rechecks[0][0])
        if self._acceptor is not None and self._acceptor.paused_until is not None:
            wake_at = min(wake_at, self._acceptor.paused_until)
        return max(wake_at - now, 0.0)

    def _close_everything(self) -> None:
        closed = 0
        for pending in list(self._pending.values()):
            self._close(pending, "bridge_stopping")
            closed += 1
        self.pending_closed_at_stop += closed
        while True:
            try:
                sock, _address = self._admitted.get_nowait()
            except queue.Empty:
                break
            sock.close()
            self._connection_closed()
        if self._listening is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listening)
            self._listening.close()
        self._selector.close()
        self._waker_read.close()
        self._waker_write.close()

    # ---- accepting ---------------------------------------------------------------------------------------
    def _accept(self) -> None:
        acceptor = self._acceptor
        assert acceptor is not None
        for sock, address in acceptor.accept_some():
            self._add(sock, address)
        if acceptor.paused_until is not None:
            self._selector.unregister(acceptor.listening)

    def _make_room(self) -> bool:
        if not self._pending:
            return False
        self._close(next(iter(self._pending.values())), "evicted_for_file_descriptors")
        return True

    def _resume_accepting(self, now: float) -> None:
        if self._acceptor is not None and self._acceptor.resume_if_due(now):
            self._selector.register(self._acceptor.listening, selectors.EVENT_READ, _LISTENING)

    def _take_admitted(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._waker_read.recv(4096):
                pass
        while True:
            try:
                sock, address = self._admitted.get_nowait()
            except queue.Empty:
                return
            self._add(sock, address)

    # ---- the pending stage -------------------------------------------------------------------------------
    def _add(self, sock: socket.socket, address: Address) -> None:
        while len(self._pending) >= self._settings.max_pending_connections:
            self._close(next(iter(self._pending.values())), "evicted")
        deadline = time.monotonic() + self._settings.association_request_timeout_seconds
        try:
            sock.setblocking(False)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()
            self._count_closed("tls_handshake_failed")
            self._connection_closed()
            return
        pending = _Pending(sock, address, deadline, tls=self._tls is not None)
        self._pending[id(pending)] = pending
        self._watch(pending, selectors.EVENT_READ)
        # A sender's request is often in already: hand it over (or drop a connection already closed) now, before
        # the connections accepted after it can push it out.
        self._advance(pending)

    def _watch(self, pending: _Pending, events: int) -> None:
        if pending.watched == events:
            return
        if pending.watched:
            self._selector.modify(pending.sock, events, pending)
        else:
            self._selector.register(pending.sock, events, pending)
        pending.watched = events

    def _unwatch(self, pending: _Pending) -> None:
        if pending.watched:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(pending.sock)
            pending.watched = 0

    def _advance(self, pending: _Pending, _mask: int = 0) -> None:
        if self._pending.get(id(pending)) is not pending:
            return  # closed earlier in this pass (evicted, expired)
        try:
            whole = self._advance_tls(pending) if self._tls is not None else self._advance_plain(pending)
        except _Dropped as dropped:
            self._drop(pending, dropped)
            return
        except OSError:
            self._close(pending, "connection_error")
            return
        except Exception:  # a bug of ours: this connection is closed, the others go on
            log.exception("pending_connection_failed", peer=pending.peer)
            self._close(pending, "internal_error")
            return
        if whole and self._request_is_acceptable(pending):
            self._hand_over(pending)

    def _advance_plain(self, pending: _Pending) -> bool:
        sock = pending.sock
        available = _readable_bytes(sock)
        if available == 0:
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    raise _Dropped("peer_closed")
            except BlockingIOError:
                pass
            self._watch(pending, selectors.EVENT_READ)  # nothing yet: wait for the first bytes
            return False
        if pending.request_length is None:
            if available < PDU_HEADER.size:
                if _peer_has_closed(sock):
                    raise _Dropped("peer_closed")
                self._recheck_later(pending)
                return False
            self._read_request_header(pending, sock.recv(PDU_HEADER.size, socket.MSG_PEEK))
        assert pending.request_length is not None
        if available < PDU_HEADER.size + pending.request_length:
            if _peer_has_closed(sock):
                raise _Dropped("peer_closed")
            self._recheck_later(pending)
            return False
        return True

    def _read_request_header(self, pending: _Pending, header: bytes) -> None:
        pdu_type, _reserved, length = PDU_HEADER.unpack(header)
        if pdu_type == A_ABORT:
            raise _Dropped("aborted_by_peer")
        if pdu_type != A_ASSOCIATE_RQ:
            unknown = not 1 <= pdu_type <= A_ABORT
            raise _Dropped("not_an_association_request", _UNRECOGNIZED_PDU if unknown else _UNEXPECTED_PDU)
        if length > MAX_ASSOCIATION_PDU_BYTES:
            raise _Dropped("association_request_too_large", _INVALID_PARAMETER)
        pending.request_length = length
        if self._tls is None and PDU_HEADER.size + length > _DEFAULT_BUFFERED_BYTES:
            with contextlib.suppress(OSError):
                pending.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 * (PDU_HEADER.size + length))

    def _advance_tls(self, pending: _Pending) -> bool:
        sock = pending.sock
        assert isinstance(sock, ssl.SSLSocket)
        if pending.handshaking:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._watch(pending, selectors.EVENT_READ)
                return False
            except ssl.SSLWantWriteError:
                self._watch(pending, selectors.EVENT_WRITE)
                return False
            except (ssl.SSLError, OSError) as exc:
                log.warning("tls_handshake_failed", peer=pending.peer, error=str(exc))
                raise _Dropped("tls_handshake_failed") from exc
            pending.handshaking = False
            self._watch(pending, selectors.EVENT_READ)
        while True:
            try:
                data = ssl.SSLSocket.recv(sock, 65536)  # not yet guarded: nothing to check until it is whole
            except ssl.SSLWantReadError:
                self._watch(pending, selectors.EVENT_READ)
                return False
            except ssl.SSLWantWriteError:
                self._watch(pending, selectors.EVENT_WRITE)
                return False
            if not data:
                raise _Dropped("peer_closed")
            pending.buffer += data
            if pending.request_length is None and len(pending.buffer) >= PDU_HEADER.size:
                self._read_request_header(pending, bytes(pending.buffer[: PDU_HEADER.size]))
            if pending.request_length is not None and len(pending.buffer) >= PDU_HEADER.size + pending.request_length:
                return True

    def _recheck_later(self, pending: _Pending) -> None:
        self._unwatch(pending)
        heapq.heappush(self._rechecks, (time.monotonic() + pending.backoff, next(self._sequence), pending))
        pending.backoff = min(pending.backoff * 2, _LAST_RECHECK_SECONDS)

    def _recheck(self, now: float) -> None:
        while self._rechecks and self._rechecks[0][0] <= now:
            _at, _sequence, pending = heapq.heappop(self._rechecks)
            self._advance(pending)

    def _expire(self, now: float) -> None:
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return
            self._close(oldest, "association_request_timeout")

    def _request_is_acceptable(self, pending: _Pending) -> bool:
        """Check the whole request (dicom/negotiation.py); refuse one that is not acceptable here, at once."""
        assert pending.request_length is not None
        size = PDU_HEADER.size + pending.request_length
        request = bytes(pending.buffer[:size]) if self._tls is not None else pending.sock.recv(size, socket.MSG_PEEK)
        if len(request) < size:  # not whole after all: look again
            self._recheck_later(pending)
            return False
        verdict = check_association_request(request)
        if isinstance(verdict, RequestRefusal):
            self._refuse(pending, verdict)
            return False
        if verdict.unknown_transfer_syntaxes:  # pynetdicom's warning for each of them is held back (logs.py)
            log.info(
                "unknown_transfer_syntaxes_proposed",
                peer=pending.peer,
                presentation_contexts=verdict.presentation_contexts,
                transfer_syntaxes=verdict.transfer_syntaxes,
                unknown_transfer_syntaxes=verdict.unknown_transfer_syntaxes,
                first_unknown=verdict.first_unknown_transfer_syntax,
            )
        return True

    def _refuse(self, pending: _Pending, refusal: RequestRefusal) -> None:
        """Answer ``refusal`` and close: the request is read first, so that closing sends no reset ahead of the
        answer."""
        log.warning(
            "association_request_refused",
            peer=pending.peer,
            reason=refusal.reason,
            detail=refusal.detail,
            answer=refusal.answer_name,
        )
        with contextlib.suppress(OSError, ValueError):
            if self._tls is None:
                pending.sock.recv(PDU_HEADER.size + (pending.request_length or 0))
            pending.sock.send(refusal.answer)
        self._close(pending, "association_request_refused")
        self._refused("malformed_request" if refusal.answer[0] == A_ABORT else "request_not_served")

    def _hand_over(self, pending: _Pending) -> None:
        self._forget(pending)
        sock, limits = pending.sock, self._settings.connection_limits
        try:
            guarded: Guarded
            if isinstance(sock, GuardedSSLSocket):
                sock.setblocking(True)
                sock.setup(limits, peer=pending.peer, on_close=self._on_connection_closed)
                sock.guard.hold(sock, bytes(pending.buffer))
                guarded = sock
            else:
                guarded = GuardedSocket.adopt(sock, limits, peer=pending.peer, on_close=self._on_connection_closed)
        except OSError:
            sock.close()
            self._count_closed("connection_error")
            self._connection_closed()
            return
        try:
            self._deliver(guarded, pending.address)
        except Exception:
            log.exception("hand_over_failed", peer=pending.peer)
            guarded.close()

    def _drop(self, pending: _Pending, dropped: _Dropped) -> None:
        if dropped.abort_reason is not None:
            with contextlib.suppress(OSError, ValueError):
                pending.sock.send(_A_ABORT_PDU + bytes([dropped.abort_reason]))
            self._refused("malformed_request")
        self._close(pending, dropped.reason)

    def _refused(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

    def _forget(self, pending: _Pending) -> None:
        self._unwatch(pending)
        self._pending.pop(id(pending), None)

    def _close(self, pending: _Pending, reason: str) -> None:
        self._forget(pending)
        with contextlib.suppress(OSError):
            pending.sock.close()
        self._count_closed(reason)
        self._connection_closed()

    def _count_closed(self, reason: str) -> None:
        self._closed_by_reason[reason] += 1

    def _connection_closed(self) -> None:
        if self._on_connection_closed is not None:
            try:
                self._on_connection_closed()
            except Exception:
                log.exception("connection_report_failed")

    def _report(self, now: float) -> None:
        """Every ``_REPORT_EVERY_SECONDS`` at most, one log event counting the pending connections closed, by
        reason (a flood of them must not flood the journal)."""
        if now < self._next_report:
            return
        self._next_report = now + _REPORT_EVERY_SECONDS
        counts: dict[str, Any] = dict(self._closed_by_reason)
        self._closed_by_reason.clear()
        benign = counts.pop("peer_closed", 0)
        if counts:
            log.warning("pending_connections_closed", **counts, peer_closed=benign, pending=len(self._pending))
        elif benign:
            log.debug("pending_connections_closed", peer_closed=benign, pending=len(self._pending))
