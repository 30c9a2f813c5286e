"""The DICOM listener (pynetdicom): Verification and Storage SCP, and the never-crash boundary.

Each C-STORE is read from the wire header-only (the elements ``extract`` needs, stopping before the pixel
data, which is never decoded), turned into an ``InstanceRecord`` and handed to the ``InstanceSink`` (the
index). Success is answered only after the sink has committed; every failure becomes a status from
``dicom/status.py`` and the association goes on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

import structlog
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacs_bridge.dicom import inline_store, reactor, store_response
from pacs_bridge.dicom.access import CallingAeRule, refusal_reason, rejection_reason
from pacs_bridge.dicom.conformance import check_request_matches_dataset
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import DEFAULT_MAX_INFLATED_BYTES, read_header
from pacs_bridge.dicom.spool import SpillingBuffer
from pacs_bridge.dicom.spool import install as install_spilling_buffers
from pacs_bridge.dicom.status import StoreStatus, status_dataset, status_for_error
from pacs_bridge.observe import BridgeObserver, NullObserver
from pacs_bridge.records import InstanceRecord, RecordOutcome

log = structlog.get_logger("pacs_bridge.dicom")
_stdlib_log = logging.getLogger("pacs_bridge.dicom")  # the logger structlog's filter_by_level asks
_SUCCESS = int(StoreStatus.SUCCESS)

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 0)  # Linux only; elsewhere the wrapper is not installed


class InstanceSink(Protocol):
    def record_instance(self, record: InstanceRecord, *, received_at: datetime) -> RecordOutcome: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerSettings:
    ae_title: str
    bind: str
    port: int
    max_associations: int = 16
    network_timeout_seconds: float = 60.0
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    max_pdu_size: int = 0  # 0: unlimited
    allowed_calling_aets: tuple[CallingAeRule, ...] = ()  # empty: any
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES  # a deflated dataset inflating to more is refused
    tls: ssl.SSLContext | None = None  # DICOM TLS when set (see server_tls_context)


def server_tls_context(certificate: str, private_key: str, client_ca: str = "") -> ssl.SSLContext:
    """The listener's TLS context: TLS 1.2 or later (BCP 195), our certificate, and when ``client_ca`` is given
    only senders presenting a certificate issued by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _received_header(event: Any, *, max_inflated_bytes: int) -> Dataset:
    """The header of the instance a C-STORE carries (in memory, or spilled to a temporary file if large)."""
    return read_header(event.request.DataSet, event.context.transfer_syntax, max_inflated_bytes=max_inflated_bytes)


def _received_size(event: Any) -> int:
    """The encoded size of the received dataset (0 when unknown)."""
    buffer = getattr(event.request, "DataSet", None)
    if isinstance(buffer, SpillingBuffer):
        return buffer.size()
    try:
        return int(buffer.getbuffer().nbytes)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return 0


class QuickAckSocket:
    """A TCP socket that acknowledges every receive at once (Linux ``TCP_QUICKACK``, re-armed after each recv).

    Many senders leave Nagle's algorithm on (Debian's DCMTK, Orthanc, pynetdicom itself, many modalities):
    they hold the last small segment of a C-STORE until the previous one is acknowledged, while the receiver
    delays its ACK by up to 40 ms or more, so each C-STORE stalls ~80 ms. Linux clears QUICKACK after use,
    hence the re-arm. Everything else passes through to the wrapped socket (``select`` uses ``fileno``).
    """

    __slots__ = ("_socket",)

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # our responses go out at once too
        self._rearm()

    def _rearm(self) -> None:
        with contextlib.suppress(OSError):  # the peer may be gone; recv reports that
            self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = self._socket.recv(bufsize, flags)
        self._rearm()
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        count = self._socket.recv_into(buffer, nbytes, flags)
        self._rearm()
        return count

    @property
    def wrapped(self) -> socket.socket:
        return self._socket

    def fileno(self) -> int:  # select() and poll() call it; __getattr__ would too, only slower
        return self._socket.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


def _acknowledge_quickly(event: Any) -> None:
    """EVT_CONN_OPEN: wrap a plain TCP association socket in ``QuickAckSocket`` before anything is read."""
    dul = event.assoc.dul
    transport = dul.socket
    raw = transport.socket
    # TLS sockets keep their own class: pynetdicom checks isinstance(SSLSocket) for pending bytes.
    if _TCP_QUICKACK and type(raw) is socket.socket and raw.type == socket.SOCK_STREAM:
        transport.socket = QuickAckSocket(raw)


class SharedContexts(list[PresentationContext]):
    """The listener's supported presentation contexts, shared by every association instead of copied for each.

    pynetdicom deep-copies the server's supported contexts for each association it accepts
    (``RequestHandler._create_association``): for the 171 contexts of 45 transfer syntaxes each that the listener
    supports, ~50 ms of CPU under the GIL per association, stalling every other association of the process
    meanwhile. Negotiation only reads them (``negotiate_as_acceptor`` answers with new contexts), so a copy
    of the list itself is all each association gets.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


class _HandedOverServer(ThreadedAssociationServer):
    """pynetdicom's association server without a listening socket of its own.

    With ``dicom.listener_processes`` above 1 the main process accepts every connection and hands it to a
    listener process (``dicom/workers.py``), which passes it to ``process_request`` exactly as pynetdicom's
    own accept loop would: one thread per association, the same events and handlers. Nothing is bound or
    listened on; ``request_done`` is called when an association's thread ends, so the main process knows how
    many each listener process still serves.
    """

    request_done: Callable[[], None] | None = None

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.request_done is not None:
                self.request_done()


class _AssociationStats:
    """Per-association counters for the closing log event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored: dict[int, int] = {}
        self._refused: dict[int, int] = {}

    def count(self, assoc: Any, *, stored: bool) -> None:
        table = self._stored if stored else self._refused
        with self._lock:
            table[id(assoc)] = table.get(id(assoc), 0) + 1

    def pop(self, assoc: Any) -> tuple[int, int]:
        with self._lock:
            return self._stored.pop(id(assoc), 0), self._refused.pop(id(assoc), 0)


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Any) -> dict[str, Any]:
    requestor = event.assoc.requestor
    return {"calling_ae": _calling_ae(event), "peer": f"{requestor.address}:{requestor.port}"}


class DicomListener:
    """Accepts associations and stores instances into an ``InstanceSink``."""

    def __init__(
        self,
        settings: ListenerSettings,
        sink: InstanceSink,
        *,
        clock: Callable[[], datetime],
        observer: BridgeObserver | None = None,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._clock = clock
        self._observer: BridgeObserver = observer or NullObserver()
        self._stats = _AssociationStats()
        self._server: Any = None
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        settings = self._settings
        ae = AE(ae_title=settings.ae_title)
        ae.require_called_aet = True
        if settings.allowed_calling_aets:
            # Unknown calling AE titles get a clean A-ASSOCIATE-RJ (calling AE title not recognised);
            # address pinning is checked once the association is established (see _handle_established).
            ae.require_calling_aet = sorted({rule.ae_title for rule in settings.allowed_calling_aets})
        ae.maximum_associations = settings.max_associations
        ae.network_timeout = settings.network_timeout_seconds
        ae.acse_timeout = settings.acse_timeout_seconds
        ae.dimse_timeout = settings.dimse_timeout_seconds
        ae.maximum_pdu_size = settings.max_pdu_size
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def is_accepting(self) -> bool:
        """Whether the listening socket is open and its accept loop alive."""
        server = self._server
        return server is not None and server.socket.fileno() != -1

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            return self._settings.port
        return int(self._server.server_address[1])

    def start(self, *, handed_over: Callable[[], None] | None = None) -> None:
        """Listen on the configured address; or, with ``handed_over`` (called as each association ends),
        listen on nothing and serve the connections passed to ``adopt``."""
        # Received datasets over a few MB spill to an anonymous temporary file (see dicom/spool.py): a 1 GB
        # tomosynthesis object then costs the bridge kilobytes of memory, a 10 kB CT slice nothing extra.
        install_spilling_buffers()
        # pynetdicom's association reactors and DUL threads wait for work instead of polling every millisecond.
        reactor.install()
        # Plain C-STORE responses are encoded in one step, not through a pydicom Dataset of the command set.
        store_response.install()
        # C-STOREs are served on the thread that read them, their command sets read in one step.
        inline_store.install()
        # pynetdicom's standard handlers log every DIMSE message, and to do so read each received dataset
        # whole (getvalue), spilled or not; our own association and instance events replace them.
        _pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        # pydicom checks every value it decodes (DIMSE command sets included) against its VR and warns; extraction
        # checks what the index needs itself (dicom/extract.py), so those checks cost CPU per instance and only
        # ever produced warnings.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._handle_connection_opened),
            (evt.EVT_CONN_CLOSE, self._handle_connection_closed),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ESTABLISHED, self._handle_established),
            (evt.EVT_RELEASED, self._handle_closed),
            (evt.EVT_ABORTED, self._handle_closed),
            (evt.EVT_REJECTED, self._handle_rejected),
        ]
        contexts = SharedContexts(self._ae.supported_contexts)
        if handed_over is not None:
            server = cast(
                _HandedOverServer,
                self._ae.make_server(
                    (self._settings.bind, 0),
                    contexts=contexts,
                    evt_handlers=handlers,
                    server_class=_HandedOverServer,
                ),
            )
            server.request_done = handed_over
            self._server = server
            return
        self._server = self._ae.start_server(
            (self._settings.bind, self._settings.port),
            block=False,
            contexts=contexts,
            evt_handlers=handlers,
            ssl_context=self._settings.tls,
        )
        log.info(
            "listener_started",
            ae_title=self._settings.ae_title,
            bind=self._settings.bind,
            port=self.port,
            tls=self._settings.tls is not None,
        )

    def stop(self, *, drain_timeout_seconds: float = 30.0) -> None:
        """Stop accepting associations, let in-flight ones finish (up to the timeout), then abort the rest."""
        server = self._server
        if server is None:
            return
        self._server = None
        handed_over = isinstance(server, _HandedOverServer)
        if not handed_over:
            # socketserver's own shutdown (not pynetdicom's, which also aborts associations): leave the accept
            # loop, then close the listening socket so new associations are refused while the open ones finish.
            socketserver.BaseServer.shutdown(server)
            server.socket.close()
        deadline = time.monotonic() + drain_timeout_seconds
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        if handed_over:
            server.server_close()  # it never served, so socketserver's shutdown() would wait for ever
        else:
            server.shutdown()
        log.info("listener_stopped", aborted_associations=len(remaining))

    def adopt(self, connection: socket.socket, address: tuple[str, int]) -> None:
        """Serve one connection accepted elsewhere (after ``start(handed_over=...)``), as pynetdicom's accept
        loop would: TLS first when configured, then a thread for the association."""
        server = self._server
        if not isinstance(server, _HandedOverServer):
            connection.close()
            raise RuntimeError("the listener does not take handed-over connections")
        if self._settings.tls is not None:
            try:
                connection = self._settings.tls.wrap_socket(connection, server_side=True)
            except OSError as exc:  # as pynetdicom's accept loop does: drop it, keep serving the others
                log.warning("tls_handshake_failed", peer=f"{address[0]}:{address[1]}", error=str(exc))
                connection.close()
                if server.request_done is not None:
                    server.request_done()
                return
        server.process_request(connection, address)

    # ---- handlers: each one catches everything, so nothing a peer sends can stop the listener ----

    def handle_store(self, event: Any) -> Dataset | int:
        """C-STORE: index the instance, then answer. Success only after the commit."""
        sop_instance_uid = ""
        calling_ae = _calling_ae(event)
        try:
            sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
            dataset = _received_header(event, max_inflated_bytes=self._settings.max_inflated_bytes)
            record = extract_instance(dataset, sending_ae_title=calling_ae)
            check_request_matches_dataset(
                record,
                affected_sop_class_uid=str(event.request.AffectedSOPClassUID or ""),
                affected_sop_instance_uid=sop_instance_uid,
                context_sop_class_uid=str(event.context.abstract_syntax or ""),
            )
            outcome = self._sink.record_instance(record, received_at=self._clock())
        except Exception as exc:
            status = status_for_error(exc)
            self._stats.count(event.assoc, stored=False)
            self._observe_instance(event, status, calling_ae)
            fields = {**_peer(event), "sop_instance_uid": sop_instance_uid, "status": f"0x{status:04X}"}
            if status is StoreStatus.PROCESSING_FAILURE:
                log.exception("instance_rejected", **fields, error=str(exc))
            else:
                log.warning("instance_rejected", **fields, error=str(exc))
            return status_dataset(status, str(exc))
        self._stats.count(event.assoc, stored=True)
        self._observe_instance(event, StoreStatus.SUCCESS, calling_ae)
        if _stdlib_log.isEnabledFor(logging.DEBUG):  # structlog would build the event only to drop it
            log.debug(
                "instance_stored",
                study_uid=record.study.study_uid,
                sop_instance_uid=record.sop_instance_uid,
                outcome=outcome.value,
                calling_ae=calling_ae,
            )
        return _SUCCESS  # a bare status: pynetdicom reads no dataset for it

    def _observe_instance(self, event: Any, status: StoreStatus, calling_ae: str) -> None:
        try:
            self._observer.instance_received(
                status=int(status), calling_ae=calling_ae, size_bytes=_received_size(event)
            )
        except Exception:  # metrics must never change the answer a sender gets
            log.exception("metrics_failed")

    @staticmethod
    def _handle_connection_opened(event: Any) -> None:
        try:
            _acknowledge_quickly(event)
            reactor.attach(event.assoc)
            inline_store.attach(event.assoc)
        except Exception:  # an optimisation: never a reason to drop the connection
            log.exception("quickack_failed")

    @staticmethod
    def _handle_connection_closed(event: Any) -> None:
        try:
            reactor.detach(event.assoc)
        except Exception:
            log.exception("reactor_detach_failed")

    @staticmethod
    def _handle_echo(event: Any) -> int:
        return int(StoreStatus.SUCCESS)

    def _handle_established(self, event: Any) -> None:
        # The access check comes first, fails closed, and stands alone: nothing after it (metrics, logging) can
        # skip the refusal. pynetdicom cannot reject on the source address, so a refused association is aborted
        # before any DIMSE message of it is processed.
        try:
            reason = refusal_reason(
                self._settings.allowed_calling_aets, _calling_ae(event), str(event.assoc.requestor.address)
            )
        except Exception as exc:
            reason = f"the access check failed ({type(exc).__name__}: {exc})"
        if reason is not None:
            event.assoc.abort()
        try:
            self._observer.association_opened()  # counted either way: the abort's EVT_ABORTED counts it closed
        except Exception:
            log.exception("metrics_failed")
        try:
            if reason is not None:
                log.warning("association_refused", **_peer(event), reason=reason)
                return
            inline_store.admit(event.assoc)
            log.info("association_established", **_peer(event))
        except Exception:  # logging must never take a handler down
            log.exception("association_log_failed")

    def _handle_closed(self, event: Any) -> None:
        try:
            self._observer.association_closed()
            stored, refused = self._stats.pop(event.assoc)
            name = "association_released" if event.event is evt.EVT_RELEASED else "association_aborted"
            log.info(name, **_peer(event), stored=stored, refused=refused)
        except Exception:
            log.exception("association_log_failed")

    def _handle_rejected(self, event: Any) -> None:
        """A-ASSOCIATE-RJ sent: which AE titles were asked for and why it was refused (pynetdicom keeps the
        request and our rejection as the service users' primitives)."""
        try:
            request = event.assoc.requestor.primitive
            rejection = event.assoc.acceptor.primitive
            called_ae = str(getattr(request, "called_ae_title", "") or "").strip()
            reason = rejection_reason(
                result_source=int(rejection.result_source),
                diagnostic=int(rejection.diagnostic),
                called_ae=called_ae,
                calling_ae=_calling_ae(event),
                our_ae=self._settings.ae_title,
                max_associations=self._settings.max_associations,
            )
            log.warning("association_rejected", **_peer(event), called_ae=called_ae, reason=reason)
        except Exception:
            log.exception("association_log_failed")
