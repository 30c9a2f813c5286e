"""The DICOM listener (pynetdicom): Verification and Storage SCP, and the never-crash boundary.

Connections come in through the front door (dicom/front_door.py), which holds each one, without a thread, until
its A-ASSOCIATE-RQ is whole, within ``association_request_timeout_seconds``; pynetdicom then serves it
(``AdoptingAssociationServer``) on a ``GuardedSocket`` (dicom/connection.py) that enforces a deadline per PDU,
the announced maximum PDU length and ``max_instance_bytes`` whatever reads it. With ``fast_path`` on and a
pynetdicom the fast path supports, the pieces of dicom/fastpath serve C-STOREs; otherwise stock pynetdicom
does, and the C-STORE handler below is the same either way. Any other DIMSE message is answered (0x0211) or
ignored by dicom/message_screen.py, on either path.

Each C-STORE is read header-only (the elements ``extract`` needs, stopping before the pixel data, which is
never decoded), turned into an ``InstanceRecord`` and handed to the ``InstanceSink`` (the index). Success is
answered only after the sink has committed; every failure becomes a status from ``dicom/status.py`` and the
association goes on.

While any listener of the process runs, the process-wide pynetdicom and pydicom switches it depends on are set
(dicom/listener_switches.py says which and why).

Stopping closes the listening socket and every pending connection at once, aborts each association that is
idle (no PDU or message partly received, no C-STORE awaiting its answer, nothing received for a second), and
gives those in the middle of a transfer up to the drain time before aborting them too.

No connection outlives its association: one whose association thread has stopped while the connection is still
open (pynetdicom failing on a request it could not negotiate) is closed, its DUL thread stopped
(``_close_orphaned``); and every association counted open is counted closed, with its end line, however it ends
(dicom/association_ledger.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom import fastpath, message_screen
from pacs_bridge.dicom.access import refusal_reason, rejection_label, rejection_reason
from pacs_bridge.dicom.association_ledger import AssociationLedger
from pacs_bridge.dicom.association_server import AdoptingAssociationServer
from pacs_bridge.dicom.conformance import check_request_matches_dataset
from pacs_bridge.dicom.connection import ConnectionLimits, Guarded
from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.front_door import FrontDoor, FrontDoorSettings
from pacs_bridge.dicom.header import read_header
from pacs_bridge.dicom.listener_settings import ListenerSettings
from pacs_bridge.dicom.listener_switches import LISTENER_SWITCHES
from pacs_bridge.dicom.received import OrphanedReceiveFiles, receive_directory, received_data_set
from pacs_bridge.dicom.status import StoreStatus, status_dataset, status_for_error
from pacs_bridge.errors import AssociationRefusedError, InstanceTooLargeError
from pacs_bridge.observe import BridgeObserver, NullObserver
from pacs_bridge.records import InstanceRecord, RecordOutcome

log = structlog.get_logger("pacs_bridge.dicom")
_stdlib_log = logging.getLogger("pacs_bridge.dicom")  # the logger structlog's filter_by_level asks
_SUCCESS = int(StoreStatus.SUCCESS)
_LISTEN_BACKLOG = 1024
_STOP_POLL_SECONDS = 0.02
_CUT_AFTER_ABORT_SECONDS = 1.0  # an aborted association whose connection is still open then is cut
_STOP_GIVE_UP_SECONDS = 10.0  # past the drain and the cut, stop returns whatever is left
# A connection still open this long after its association thread stopped is closed (its normal end closes it
# before the thread stops); its DUL thread is stopped first and given this long again to let go of the socket.
_ORPHAN_GRACE_SECONDS = 1.0


class InstanceSink(Protocol):
    def record_instance(self, record: InstanceRecord, *, received_at: datetime) -> RecordOutcome: ...


def _received_size(event: Any) -> int:
    """The encoded size of the received data set (0 when unknown)."""
    try:
        received = received_data_set(event)
    except (AttributeError, OSError, TypeError, ValueError):
        return 0
    received.close()
    return received.size


class _Connection:
    """One connection the front door handed over, and its association once pynetdicom made it."""

    __slots__ = ("assoc", "ended_at", "guard", "orphan_cut_at", "orphaned_at")

    def __init__(self, guarded: Guarded) -> None:
        self.guard = guarded
        self.assoc: Any = None
        self.ended_at: float | None = None  # when the stop aborted (or cut) it
        self.orphaned_at: float | None = None  # when its association thread was first seen stopped, the socket open
        self.orphan_cut_at: float | None = None  # when the connection was cut for that

    def association_running(self) -> bool:
        """Whether its association thread is running."""
        return self.assoc is not None and self.assoc.is_alive()

    def association_stopped(self) -> bool:
        """Whether its association thread was started and has stopped."""
        return self.assoc is not None and self.assoc.ident is not None and not self.assoc.is_alive()


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
        self._ledger = AssociationLedger(self._observer)
        self._server: Any = None
        self._front_door: FrontDoor | None = None
        self._fast_path: fastpath.FastPath | fastpath.FastPathUnavailable = fastpath.FastPathUnavailable(
            "the listener is not started"
        )
        self._screen: message_screen.Screen = message_screen.MessageScreenUnavailable("the listener is not started")
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}  # by id of its socket
        self._let_in: weakref.WeakSet[Any] = weakref.WeakSet()  # associations the access check let in
        self._orphans: OrphanedReceiveFiles | None = None  # from start, in the process's receive directory
        self._holds_switches = False  # LISTENER_SWITCHES, from start to stop
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
        ae.maximum_pdu_size = settings.max_pdu_bytes
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def is_accepting(self) -> bool:
        """Whether the front door is open and its loop alive."""
        return self._front_door is not None and self._front_door.is_accepting

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._front_door is None or not self._front_door.port:
            return self._settings.port
        return self._front_door.port

    @property
    def fast_path(self) -> fastpath.FastPath | fastpath.FastPathUnavailable:
        """What serves C-STOREs: the fast path's pieces, or stock pynetdicom and why."""
        return self._fast_path

    @property
    def message_screen(self) -> message_screen.Screen:
        """What answers the DIMSE messages the bridge does not serve: the screen, or pynetdicom and why."""
        return self._screen

    @property
    def associations(self) -> list[Any]:
        """The pynetdicom associations being served (acceptors, established or not yet)."""
        return list(self._server.active_associations) if self._server is not None else []

    @property
    def open_connections(self) -> int:
        """Connections handed to pynetdicom and not yet closed."""
        return len(self._live_connections())

    @property
    def pending_connections(self) -> int:
        """Connections whose association request is not yet whole."""
        return self._front_door.pending_connections if self._front_door is not None else 0

    def start(self, *, listen: bool = True, on_connection_closed: Callable[[], None] | None = None) -> None:
        """Listen on the configured address; or, with ``listen=False``, serve the connections passed to
        ``adopt``. ``on_connection_closed`` is called once for each connection that ends, handed over or not."""
        if self._front_door is not None:
            raise RuntimeError("the listener is already started")
        LISTENER_SWITCHES.hold()
        self._holds_switches = True
        try:
            self._start(listen=listen, on_connection_closed=on_connection_closed)
        except BaseException:
            self._let_go_of_switches()
            raise

    def _let_go_of_switches(self) -> None:
        if self._holds_switches:
            self._holds_switches = False
            LISTENER_SWITCHES.let_go()

    def _start(self, *, listen: bool, on_connection_closed: Callable[[], None] | None) -> None:
        settings = self._settings
        self._fast_path = (
            fastpath.enable() if settings.fast_path else fastpath.FastPathUnavailable("dicom.fast_path is off")
        )
        self._screen = message_screen.enable(wanted=settings.message_screen)
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
        contexts = self._ae.supported_contexts
        if isinstance(self._fast_path, fastpath.FastPath):
            contexts = self._fast_path.contexts(contexts)
        self._server = self._ae.make_server(
            (settings.bind, 0), contexts=contexts, evt_handlers=handlers, server_class=AdoptingAssociationServer
        )
        listening = None
        if listen:
            family = socket.AF_INET6 if ":" in settings.bind else socket.AF_INET
            listening = socket.create_server((settings.bind, settings.port), family=family, backlog=_LISTEN_BACKLOG)
        self._orphans = OrphanedReceiveFiles(receive_directory())
        self._front_door = FrontDoor(
            FrontDoorSettings(
                max_pending_connections=settings.max_pending_connections,
                association_request_timeout_seconds=settings.association_request_timeout_seconds,
                connection_limits=ConnectionLimits(
                    pdu_timeout_seconds=settings.pdu_timeout_seconds,
                    max_pdu_bytes=settings.max_pdu_bytes,
                    max_instance_bytes=settings.max_instance_bytes,
                ),
            ),
            deliver=self._serve,
            listening=listening,
            tls=settings.tls,
            on_connection_closed=on_connection_closed,
            on_tick=self._look_after_connections,
            on_refused=self._count_refusal,
        )
        self._front_door.start()
        fast = self._fast_path
        fields: dict[str, Any] = (
            {"fast_path": "on", "fast_path_pieces": sorted(fast.pieces)}
            if isinstance(fast, fastpath.FastPath)
            else {"fast_path": "off", "fast_path_reason": fast.reason}
        ) | self._screen.log_fields()
        if listen:
            log.info(
                "listener_started",
                ae_title=settings.ae_title,
                bind=settings.bind,
                port=self.port,
                tls=settings.tls is not None,
                listener_processes=1,  # this process serves the associations (else ListenerPool logs this line)
                **fields,
            )
        else:
            log.info("listener_ready", ae_title=settings.ae_title, tls=settings.tls is not None, **fields)

    def adopt(self, connection: socket.socket, address: tuple[str, int]) -> None:
        """Serve one connection accepted elsewhere (after ``start(listen=False)``): it goes through the front
        door's pending stage like one accepted here."""
        front_door = self._front_door
        if front_door is None:
            connection.close()
            raise RuntimeError("the listener is not started")
        front_door.admit(connection, address)

    def _serve(self, guarded: Guarded, address: tuple[str, int]) -> None:
        """The front door's delivery: a connection whose association request is whole, to pynetdicom."""
        self._forget_closed(time.monotonic())
        with self._lock:
            self._connections[id(guarded)] = _Connection(guarded)
        self._server.process_request(guarded, address)

    def _forget_closed(self, now: float) -> None:
        """Drop the connections that have closed and whose association thread has stopped; note those that may
        have left a message unserved; end, in the ledger, an association that ended without its event."""
        with self._lock:
            closed = [
                key
                for key, known in self._connections.items()
                if known.guard.guard.is_closed and not known.association_running()
            ]
            forgotten = [self._connections.pop(key) for key in closed]
        for known in forgotten:
            # A refused association may also leave a C-STORE that came in before its abort unserved, file and all.
            unserved = known.guard.guard.monitor.message_unfinished or known.assoc not in self._let_in
            if unserved and self._orphans is not None:
                self._orphans.note_interrupted(now)
            if known.assoc is not None:
                # A DUL thread stopped by an exception raised no EVT_CONN_CLOSE: release what the fast path holds
                # for it now (its eventfd, a partial data set), not when the association is collected.
                if not known.assoc.dul.is_alive():
                    self._handle_connection_closed_for(known.assoc)
                self._ledger.ended(known.assoc, released=False, cause="error")

    def _look_after_connections(self, now: float) -> None:
        """On the front door's thread, at least once a second."""
        self._forget_closed(now)
        self._close_orphaned(now)
        if self._orphans is not None:
            self._orphans.sweep(now)

    def _close_orphaned(self, now: float) -> None:
        """Close each connection whose association thread stopped without closing it: first stop its DUL thread
        and cut the connection (which wakes that thread), then, once the thread has stopped (or a grace period
        later), close the socket."""
        with self._lock:
            candidates = [
                known
                for known in self._connections.values()
                if not known.guard.guard.is_closed and known.association_stopped()
            ]
        for known in candidates:
            assoc = known.assoc
            if known.orphaned_at is None:
                known.orphaned_at = now
                continue
            if known.orphan_cut_at is None:
                if now - known.orphaned_at < _ORPHAN_GRACE_SECONDS:
                    continue
                log.warning("association_thread_stopped", peer=known.guard.guard.peer, action="connection closed")
                known.orphan_cut_at = now
                with contextlib.suppress(Exception):
                    assoc.dul.kill_dul()
                known.guard.cut()
                continue
            if assoc.dul.is_alive() and now - known.orphan_cut_at < _ORPHAN_GRACE_SECONDS:
                continue
            self._handle_connection_closed_for(assoc)
            with contextlib.suppress(Exception):
                assoc.dul.socket.close()
            known.guard.close()

    def _live_connections(self) -> list[_Connection]:
        with self._lock:
            return [known for known in self._connections.values() if not known.guard.guard.is_closed]

    def stop(self, *, drain_timeout_seconds: float = 30.0) -> None:
        """Stop accepting, close pending and idle connections at once, let associations in the middle of a
        transfer go on for up to ``drain_timeout_seconds``, then abort them."""
        front_door = self._front_door
        if front_door is None:
            return
        self._front_door = None
        front_door.stop()
        deadline = time.monotonic() + drain_timeout_seconds
        idle_aborted = drained_aborted = 0
        while True:
            now = time.monotonic()
            live = self._live_connections()
            if not live or now > deadline + _CUT_AFTER_ABORT_SECONDS + _STOP_GIVE_UP_SECONDS:
                break
            for connection in live:
                if connection.ended_at is not None:
                    if now - connection.ended_at > _CUT_AFTER_ABORT_SECONDS:
                        connection.guard.cut()
                    continue
                in_transfer = connection.guard.guard.in_transfer(now)
                if in_transfer and now < deadline:
                    continue
                if self._end(connection, now):
                    if in_transfer:
                        drained_aborted += 1
                    else:
                        idle_aborted += 1
            time.sleep(_STOP_POLL_SECONDS)
        left = len(self._live_connections())
        self._server.server_close()
        self._orphans = None
        self._let_go_of_switches()
        log.info(
            "listener_stopped",
            aborted_associations=idle_aborted + drained_aborted,
            idle_aborted=idle_aborted,
            aborted_after_drain=drained_aborted,
            pending_closed=front_door.pending_closed_at_stop,
            **({"connections_left_open": left} if left else {}),
        )

    @staticmethod
    def _end(connection: _Connection, now: float) -> bool:
        """Abort ``connection``'s association (on a thread of its own: pynetdicom's abort waits for the peer to
        close) or, before there is one, cut the connection. True when an association was aborted."""
        connection.ended_at = now
        assoc = connection.assoc
        if assoc is not None and assoc.is_established:
            threading.Thread(target=assoc.abort, name="pacs-bridge-stop-abort", daemon=True).start()
            return True
        connection.guard.cut()
        return False

    # ---- handlers: each one catches everything, so nothing a peer sends can stop the listener ----

    def handle_store(self, event: Any) -> Dataset | int:
        """C-STORE: index the instance, then answer. Success only after the commit."""
        sop_instance_uid = ""
        calling_ae = _calling_ae(event)
        try:
            sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
            if event.assoc not in self._let_in:  # refused; this C-STORE came in before the abort
                raise AssociationRefusedError("association refused by the access check (dicom.allowed_calling_aets)")
            dataset = self._received_header(event)
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
            self._ledger.count(event.assoc, status)
            self._observe_instance(event, status, calling_ae)
            fields = {**_peer(event), "sop_instance_uid": sop_instance_uid, "status": f"0x{status:04X}"}
            if status is StoreStatus.PROCESSING_FAILURE:
                log.exception("instance_rejected", **fields, error=str(exc))
            else:
                log.warning("instance_rejected", **fields, error=str(exc))
            return status_dataset(status, str(exc))
        self._ledger.count(event.assoc, _SUCCESS)
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

    def _received_header(self, event: Any) -> Dataset:
        """The header of the instance a C-STORE carries; ``InstanceTooLargeError`` when its data set is over
        ``max_instance_bytes`` (the guarded socket dropped what came past the limit)."""
        received = received_data_set(event)
        try:
            limit = self._settings.max_instance_bytes
            if received.size > limit:
                raise InstanceTooLargeError(received.size, limit)
            return read_header(
                received.stream, event.context.transfer_syntax, max_inflated_bytes=self._settings.max_inflated_bytes
            )
        finally:
            received.close()

    def _observe_instance(self, event: Any, status: StoreStatus, calling_ae: str) -> None:
        try:
            self._observer.instance_received(
                status=int(status), calling_ae=calling_ae, size_bytes=_received_size(event)
            )
        except Exception:  # metrics must never change the answer a sender gets
            log.exception("metrics_failed")

    def _handle_connection_opened(self, event: Any) -> None:
        """EVT_CONN_OPEN: note the association of the connection (for the stop); prepare it for the fast path."""
        assoc = event.assoc
        with self._lock:
            connection = self._connections.get(id(assoc.dul.socket.socket))
        if connection is not None:
            connection.assoc = assoc
        try:
            self._screen.install(assoc)
        except Exception:  # pynetdicom dispatches its messages itself then
            log.exception("message_screen_install_failed")
        fast = self._fast_path
        if isinstance(fast, fastpath.FastPath):
            try:
                fast.prepare(assoc)
            except Exception:  # pynetdicom serves it its own way then
                log.exception("fast_path_prepare_failed")

    def _handle_connection_closed(self, event: Any) -> None:
        self._handle_connection_closed_for(event.assoc)

    def _handle_connection_closed_for(self, assoc: Any) -> None:
        fast = self._fast_path
        if isinstance(fast, fastpath.FastPath):
            try:
                fast.connection_closed(assoc)
            except Exception:
                log.exception("fast_path_close_failed")

    @staticmethod
    def _handle_echo(event: Any) -> int:
        return int(StoreStatus.SUCCESS)

    def _handle_established(self, event: Any) -> None:
        # The access check comes first, fails closed, and stands alone: metrics, logging and the fast path each
        # run in a try of their own after it, so none of them can skip a refusal. pynetdicom cannot reject on
        # the source address, so a refused association is aborted; C-STOREs it received before (the A-ASSOCIATE-AC
        # precedes this handler) are refused by handle_store, which stores only for associations let in here.
        try:
            reason = refusal_reason(
                self._settings.allowed_calling_aets, _calling_ae(event), str(event.assoc.requestor.address)
            )
        except Exception as exc:
            reason = f"the access check failed ({type(exc).__name__}: {exc})"
        if reason is None:
            self._let_in.add(event.assoc)
        else:
            self._refuse(event.assoc)
        try:
            # Counted either way: the abort ends it in the ledger.
            self._ledger.opened(event.assoc, _peer(event))
        except Exception:
            log.exception("association_log_failed")
        if reason is not None:
            try:
                log.warning("association_refused", **_peer(event), reason=reason)
            except Exception:
                log.exception("association_log_failed")
            self._count_refusal("address_not_allowed")
            return
        fast = self._fast_path
        if isinstance(fast, fastpath.FastPath):
            try:
                fast.let_in(event.assoc)
            except Exception:  # its C-STOREs take pynetdicom's way then
                log.exception("fast_path_let_in_failed")
        try:
            log.info("association_established", **_peer(event))
        except Exception:
            log.exception("association_log_failed")

    def _refuse(self, assoc: Any) -> None:
        """Abort a refused association (inside an event handler pynetdicom's abort queues the A-ABORT); when the
        abort itself fails, cut its connection instead: a refusal never depends on pynetdicom's abort working."""
        try:
            assoc.abort()
            return
        except Exception:
            log.exception("association_abort_failed")
        with self._lock:
            refused = [known for known in self._connections.values() if known.assoc is assoc]
        for connection in refused:
            connection.guard.cut()

    def _handle_closed(self, event: Any) -> None:
        try:
            self._ledger.ended(event.assoc, released=event.event is evt.EVT_RELEASED)
            self._screen.association_ended(event.assoc)
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
            self._count_refusal(
                rejection_label(result_source=int(rejection.result_source), diagnostic=int(rejection.diagnostic))
            )
        except Exception:
            log.exception("association_log_failed")

    def _count_refusal(self, reason: str) -> None:
        try:
            self._observer.association_refused(reason=reason)
        except Exception:  # metrics must never change what a peer gets
            log.exception("metrics_failed")
