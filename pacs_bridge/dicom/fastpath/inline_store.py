"""Fast path piece ``inline_store``: C-STORE requests served on the DUL thread that read them, without
pynetdicom's DIMSE message machinery.

For every P-DATA-TF it receives, pynetdicom's DUL thread runs the state machine's DT-2 action: the DIMSE
provider collects the fragments, decodes the command set into a pydicom ``Dataset``, converts that element by
element into a ``C_STORE`` primitive and queues it for the association's own thread. That thread wakes, looks
up the service class, builds a response primitive, calls the EVT_C_STORE handler, encodes the response and
queues it back to the DUL thread, which wakes once more to send it. Per 10 kB instance that is about 0.15 ms
of decoding alone and four thread hand-overs under the GIL, paid by every association of the process.

``prepare`` also stands in for the DUL's ``_read_pdu_data`` on the association: a P-DATA-TF received while
established (Sta6) with no other event queued is peeked at, read into one buffer (``recv_into``) and its items
handed to this association's ``InlineStore`` at once, as DT-2 would, instead of being read 4 kB at a time,
decoded into pynetdicom's PDU and item objects, queued as an event and taken back out on the DUL's next pass.
It reads through the listener's ``GuardedSocket`` (dicom/connection.py) like pynetdicom would, so the PDU
deadline and the stream checks hold the same. Other PDUs, TLS sockets, PDUs over ``LARGEST_PDU_READ_WHOLE`` and
associations with a handler bound to the PDU, data or state machine events are read by pynetdicom as before.

``patch`` replaces the DT-2 action. On an association that ``prepare`` prepared and the listener then let in
(``let_in``, at EVT_ESTABLISHED), a C-STORE request is taken apart here instead: command fragments are
collected and the command set read with ``struct`` (implicit VR little endian, PS3.7 6.3.1), dataset
fragments go into a ``SpillingBuffer``, and once the last one is in, the EVT_C_STORE handler bound to the
association is triggered on this thread with a ``C_STORE`` primitive and the presentation context, as
pynetdicom's Storage SCP triggers it. A plain response (a bare status) is encoded in one step
(``encode_store_response``, byte for byte as pynetdicom's DIMSE message would encode it: a pydicom ``Dataset`` of
the command set, validated element by element and encoded twice, is ~0.25 ms per response) and written to the
socket at once; a status dataset goes through pynetdicom's ``send_msg``.

A C-STORE whose Affected SOP Class UID names no storage SOP class (e.g. "31") on a context negotiated for one is
served here too: pynetdicom would abort the association, the handler answers 0xA900 and it goes on. Anything
else goes pynetdicom's way unchanged, fragment by fragment (and on through dicom/message_screen.py): C-ECHO and
every other message, a C-STORE under a context and SOP class pynetdicom would not serve as storage, one whose
command set lacks a required field or carries one that does not decode, anything during release, and every
association with a handler bound to the DIMSE or PDU events this path does not raise. The sender waits for each
response before its next request (no asynchronous operations are negotiated), so answers cannot overtake each
other. ``patch`` and ``unpatch`` swap the DT-2 action; associations not prepared get pynetdicom's own.
``tests/integration/test_fastpath_inline_store.py`` fails if this stops applying.
"""

from __future__ import annotations

import functools
import re
import socket
import struct
import threading
from collections.abc import Iterable
from typing import Any

import structlog
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt, fsm
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from pacs_bridge.dicom.connection import GuardedSocket
from pacs_bridge.dicom.extract import MAX_UID_LENGTH
from pacs_bridge.dicom.spool import SpillingBuffer

log = structlog.get_logger("pacs_bridge.dicom")

_PREPARED = "_pacs_bridge_inline_store"
_PATCHED = "_pacs_bridge_inline_dt_2"
_COMMAND_FRAGMENT = 0x01  # message control header bits (PS3.8 E.2)
_LAST_FRAGMENT = 0x02
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
_HANDLER_FAILED = 0xC211  # the status pynetdicom's Storage SCP answers when the handler raises
_P_DATA_TF = 0x04
_LAST_COMMAND_FRAGMENT = b"\x03"  # message control header: command, last fragment
_IMPLICIT_ELEMENT = struct.Struct("<HHI")
_CONFORMANT_UID = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
# The buffer for a PDU read whole is allocated from its header's length, before the bytes arrive: a longer one
# (a peer may announce up to 4 GiB when no maximum is negotiated) is left to pynetdicom's read.
LARGEST_PDU_READ_WHOLE = 1 << 20
_ITEM_HEADER = struct.Struct(">LB")  # presentation data value item: length, presentation context ID
_US = struct.Struct("<H")
# Events this path does not raise: an association with a handler bound to one of them is left to pynetdicom.
_OBSERVED_EVENTS = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT)
# Events raised while pynetdicom reads and acts on a PDU: with a handler bound to one, it reads every PDU itself.
_OBSERVED_ON_READ = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)


def command_elements(encoded: bytes) -> dict[int, bytes]:
    """The elements of an encoded command set (group 0000, implicit VR little endian) by element number.

    Raises ``ValueError`` when the bytes are not a sequence of whole group-0000 elements."""
    elements: dict[int, bytes] = {}
    position, end = 0, len(encoded)
    while position < end:
        if end - position < _IMPLICIT_ELEMENT.size:
            raise ValueError("the command set ends inside an element header")
        group, element, length = _IMPLICIT_ELEMENT.unpack_from(encoded, position)
        position += _IMPLICIT_ELEMENT.size
        if group != 0x0000 or length > end - position:
            raise ValueError(f"({group:04X},{element:04X}) is not a whole command element")
        elements[element] = encoded[position : position + length]
        position += length
    return elements


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii")


def _unsigned_short(value: bytes | None) -> int | None:
    return _US.unpack(value)[0] if value is not None and len(value) == _US.size else None


@functools.lru_cache(maxsize=1024)  # mostly SOP class UIDs, which recur with every instance
def _conformant_class_uid(value: bytes) -> UID | None:
    return _conformant_instance_uid(value)


def _conformant_instance_uid(value: bytes) -> UID | None:
    """``value`` (a UI value, NUL-padded) as a UID when it is conformant (PS3.5 9.1: at most 64 characters,
    components of digits without leading zeros), else None."""
    text = value.rstrip(b"\x00 ")
    if len(text) > MAX_UID_LENGTH or _CONFORMANT_UID.fullmatch(text) is None:
        return None
    return UID(text.decode("ascii"))


def store_request(elements: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE request these command elements describe, or None for any other message or a command set
    pynetdicom should judge itself (a required field missing, a value its primitive would refuse)."""
    if _unsigned_short(elements.get(0x0100)) != _C_STORE_RQ:
        return None
    message_id = _unsigned_short(elements.get(0x0110))
    priority = _unsigned_short(elements.get(0x0700))
    data_set_type = _unsigned_short(elements.get(0x0800))
    sop_class, sop_instance = elements.get(0x0002), elements.get(0x1000)
    if message_id is None or priority is None or sop_class is None or sop_instance is None:
        return None
    if data_set_type is None or data_set_type == _NO_DATA_SET:
        return None
    request = C_STORE()
    try:
        request.MessageID = message_id
        request.Priority = priority
        class_uid, instance_uid = _conformant_class_uid(sop_class), _conformant_instance_uid(sop_instance)
        if class_uid is not None and instance_uid is not None:
            # What the setters would store, without their validation (12 % of the GIL time of a listener process
            # with small instances): it passes every UID this pattern admits, without a warning.
            request._affected_sop_class_uid = class_uid
            request._affected_sop_instance_uid = instance_uid
        else:  # the setters judge: refuse (ValueError), or accept with a warning in pynetdicom's log
            request.AffectedSOPClassUID = _text(sop_class)
            request.AffectedSOPInstanceUID = _text(sop_instance)
        originator_ae, originator_id = elements.get(0x1030), elements.get(0x1031)
        if originator_ae is not None:
            request.MoveOriginatorApplicationEntityTitle = _text(originator_ae)
        if originator_id is not None:
            move_message_id = _unsigned_short(originator_id)
            if move_message_id is None:
                return None
            request.MoveOriginatorMessageID = move_message_id
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    return request


_C_STORE_RSP = 0x8001  # CommandField
_PDV_OVERHEAD = 6  # PDV item length (4) + context ID (1) + message control header (1)


def _command_element(element: int, value: bytes) -> bytes:
    """One command-group element, implicit VR little endian."""
    return _IMPLICIT_ELEMENT.pack(0x0000, element, len(value)) + value


def _padded_uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def encode_store_response(*, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP without optional fields (PS3.7 9.3.1.2), implicit VR little endian."""
    body = b"".join(
        (
            _command_element(0x0002, _padded_uid(sop_class_uid)),
            _command_element(0x0100, _US.pack(_C_STORE_RSP)),
            _command_element(0x0120, _US.pack(message_id)),
            _command_element(0x0800, _US.pack(_NO_DATA_SET)),
            _command_element(0x0900, _US.pack(status)),
            _command_element(0x1000, _padded_uid(sop_instance_uid)),
        )
    )
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def plain_response_pdv(
    *, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, max_pdu: int
) -> bytes | None:
    """The one presentation data value (message control header and command set) of a C-STORE response without
    optional fields, or None to leave it to pynetdicom: a value that does not encode (pynetdicom validates and
    reports), or too large for the peer's maximum PDU (0: no limit; pynetdicom fragments it)."""
    try:
        encoded = encode_store_response(
            message_id=message_id, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, status=status
        )
    except (UnicodeEncodeError, struct.error):
        return None
    if max_pdu and len(encoded) + _PDV_OVERHEAD > max_pdu:
        return None
    return _LAST_COMMAND_FRAGMENT + encoded


def _p_data_tf(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value item (PS3.8 9.3.5)."""
    item = _ITEM_HEADER.pack(len(pdv) + 1, context_id) + pdv
    return _PDU_HEADER.pack(_P_DATA_TF, 0x00, len(item)) + item


class InlineStore:
    """One association's C-STOREs, collected and served on its DUL thread (see the module docstring)."""

    __slots__ = ("_command", "_context", "_dataset", "_forwarding", "_request", "pdus_read", "peer_let_in", "served")

    def __init__(self) -> None:
        # pynetdicom sends the A-ASSOCIATE-AC before it runs the EVT_ESTABLISHED handlers, where the listener
        # may still refuse the peer (calling AE pinned to other addresses): until ``let_in``, every request takes
        # pynetdicom's way, which the association thread serves only after those handlers.
        self.peer_let_in = False
        self._command = bytearray()
        self._request: C_STORE | None = None
        self._context: Any = None  # the accepted presentation context of the request being received
        self._dataset: SpillingBuffer | None = None
        self._forwarding = False  # the message being received is pynetdicom's
        self.served = 0  # C-STOREs served here (tests read these counters)
        self.pdus_read = 0  # P-DATA-TF PDUs read by _read_pdu_data rather than by pynetdicom

    def receive(self, dul: Any, items: Iterable[tuple[int, bytes | memoryview]]) -> None:
        """Take in the presentation data value items of one received P-DATA-TF PDU, as (context ID, value)."""
        for context_id, data in items:
            if self._forwarding or not data or not self.peer_let_in:
                self._forward(dul, context_id, data)
                continue
            header = data[0]
            if header & _COMMAND_FRAGMENT:
                if self._request is not None:  # a new command inside a dataset: pynetdicom's to judge
                    self.give_up()
                    self._forward(dul, context_id, data)
                    continue
                self._command += data[1:]
                if header & _LAST_FRAGMENT:
                    self._command_received(dul, context_id)
            elif self._request is None:  # a dataset fragment without a command: pynetdicom's to judge
                self._forward(dul, context_id, data)
            else:
                assert self._dataset is not None
                self._dataset.write(memoryview(data)[1:])
                if header & _LAST_FRAGMENT:
                    self._serve(dul)

    def _command_received(self, dul: Any, context_id: int) -> None:
        command, self._command = bytes(self._command), bytearray()
        assoc = dul.assoc
        context = assoc._accepted_cx.get(context_id)
        request = None
        if context is not None and self._serves(assoc):
            try:
                request = store_request(command_elements(command))
            except ValueError:
                request = None
        if request is None or not _is_storage(assoc, request, context):
            self._forward(dul, context_id, _LAST_COMMAND_FRAGMENT + command)
            return
        request._context_id = context_id
        self._dataset = SpillingBuffer()
        request.DataSet = self._dataset
        self._request, self._context = request, context

    @staticmethod
    def _serves(assoc: Any) -> bool:
        if assoc._sent_release or not assoc.get_handlers(evt.EVT_C_STORE):
            return False
        return not any(assoc.get_handlers(event) for event in _OBSERVED_EVENTS)

    def _serve(self, dul: Any) -> None:
        request, context = self._request, self._context
        assert request is not None and self._dataset is not None
        dataset, self._request, self._dataset = self._dataset, None, None
        assoc = dul.assoc
        try:
            status: Any = evt.trigger(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        except Exception:  # as pynetdicom's Storage SCP: a failure status, and the association goes on
            log.exception("store_handler_failed", sop_instance_uid=str(request.AffectedSOPInstanceUID))
            status = _HANDLER_FAILED
        finally:
            dataset.close()
        self.served += 1
        if not assoc.is_established:  # the handler, or a stop meanwhile, ended the association
            return
        pdv = None
        if type(status) is int:  # a bare status; a status dataset goes pynetdicom's way
            pdv = plain_response_pdv(
                message_id=request.MessageID,  # type: ignore[arg-type]
                sop_class_uid=request.AffectedSOPClassUID,  # type: ignore[arg-type]
                sop_instance_uid=request.AffectedSOPInstanceUID,  # type: ignore[arg-type]
                status=status,
                max_pdu=assoc.dimse.maximum_pdu_size,
            )
        if pdv is not None:
            dul.socket.send(_p_data_tf(context.context_id, pdv))
            return
        response = C_STORE()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response = StorageServiceClass(assoc).validate_status(status, response)
        assoc.dimse.send_msg(response, context.context_id)

    def give_up(self) -> None:
        """Drop a half-received request: pynetdicom takes the stream from here."""
        if self._dataset is not None:
            self._dataset.close()
        self._request, self._dataset = None, None

    def _forward(self, dul: Any, context_id: int, data: bytes | memoryview) -> None:
        """Hand one presentation data value to pynetdicom's DIMSE provider, as its DT-2 would."""
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, bytes(data)))
        dimse = dul.assoc.dimse
        dimse.receive_primitive(primitive)
        self._forwarding = dimse.message is not None  # pynetdicom resets it once the message is complete


def _is_storage(assoc: Any, request: C_STORE, context: Any) -> bool:
    """Whether ``request`` is a C-STORE for the Storage SCP: pynetdicom would serve it with the stock Storage SCP,
    or it came on a context negotiated for a storage SOP class. pynetdicom picks the service by the request's
    Affected SOP Class UID alone and aborts the association when that names no service it knows (e.g. "31");
    served here, the handler answers such a request 0xA900 (it is not the context's SOP class) and the association
    goes on."""
    if pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE:
        return False
    sop_class = request.AffectedSOPClassUID
    if sop_class in assoc.acceptor.accepted_common_extended:
        return False
    return _is_storage_class(sop_class) or _is_storage_class(context.abstract_syntax)


def _is_storage_class(sop_class: Any) -> bool:
    service_class = uid_to_service_class(sop_class)
    return isinstance(service_class, type) and service_class.SCP is StorageServiceClass.SCP


_STOCK_DT_2 = fsm.DT_2


def _inline_dt_2(dul: Any) -> str:
    """The state machine's DT-2 (Sta6 + Evt10: P-DATA-TF received), serving C-STOREs inline when prepared."""
    inline = getattr(dul, _PREPARED, None)
    if not isinstance(inline, InlineStore):
        return _STOCK_DT_2(dul)
    items = dul._recv_pdu.get(False).presentation_data_value_items
    inline.receive(dul, ((item.presentation_context_id, item.presentation_data_value) for item in items))
    return "Sta6"


def presentation_data_values(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """The presentation data value items of a P-DATA-TF PDU's body (PS3.8 9.3.5) as (context ID, value), or
    None when the body is not a sequence of whole items."""
    items = []
    position, end = 0, len(body)
    while position < end:
        if end - position < _ITEM_HEADER.size:
            return None
        length, context_id = _ITEM_HEADER.unpack_from(body, position)
        position += _ITEM_HEADER.size
        if length < 1 or length - 1 > end - position:
            return None
        items.append((context_id, body[position : position + length - 1]))
        position += length - 1
    return items


def _read_pdu_data(dul: Any, inline: InlineStore) -> None:
    """Stands in for the DUL's ``_read_pdu_data`` on a prepared association: a P-DATA-TF received in Sta6 is
    read in one piece and its items handed to ``inline`` straight away (what the state machine's DT-2 would do
    with it), without decoding it into pynetdicom's PDU objects and without the event queue. Anything else, and
    anything while an event is queued or an observer would miss something, is pynetdicom's own read."""
    transport = dul.socket
    sock = transport.socket
    assoc = dul.assoc
    if (
        not inline.peer_let_in
        or not isinstance(sock, GuardedSocket)  # TLS: the bytes waiting are not the socket's
        or dul.state_machine.current_state != "Sta6"
        or not dul.event_queue.empty()  # what is queued goes first
        or any(assoc.get_handlers(event) for event in _OBSERVED_ON_READ)
    ):
        type(dul)._read_pdu_data(dul)
        return
    try:
        header = sock.recv(_PDU_HEADER.size, socket.MSG_PEEK)
    except OSError:
        header = b""
    if len(header) < _PDU_HEADER.size:
        type(dul)._read_pdu_data(dul)
        return
    pdu_type, _, length = _PDU_HEADER.unpack(header)
    if pdu_type != _P_DATA_TF or length > LARGEST_PDU_READ_WHOLE:
        type(dul)._read_pdu_data(dul)  # pynetdicom's read grows its buffer as the bytes arrive
        return
    pdu = bytearray(_PDU_HEADER.size + length)
    view = memoryview(pdu)
    received = 0
    try:
        while received < len(pdu):
            count = sock.recv_into(view[received:])
            if not count:
                raise ConnectionError(f"the connection closed {received} bytes into a {len(pdu)}-byte PDU")
            received += count
    except (OSError, TimeoutError) as exc:
        log.warning("connection_closed_in_pdu", error=str(exc))
        dul.event_queue.put("Evt17")  # transport connection closed, as pynetdicom's own read reports it
        return
    items = presentation_data_values(view[_PDU_HEADER.size :])
    if items is None:
        log.warning("invalid_p_data_tf", length=length)
        dul.event_queue.put("Evt19")  # invalid PDU, as pynetdicom's own read reports it
        return
    inline.pdus_read += 1
    inline.receive(dul, items)


def patch() -> None:
    """Replace the state machine's DT-2 action (idempotent; associations not prepared behave as before)."""
    description, action, state = fsm.ACTIONS["DT-2"]
    if getattr(action, _PATCHED, False):
        return
    setattr(_inline_dt_2, _PATCHED, True)
    fsm.ACTIONS["DT-2"] = (description, _inline_dt_2, state)


def unpatch() -> None:
    """Give the state machine pynetdicom's DT-2 back."""
    description, _action, state = fsm.ACTIONS["DT-2"]
    fsm.ACTIONS["DT-2"] = (description, _STOCK_DT_2, state)


def prepare(assoc: Any) -> bool:
    """Serve ``assoc``'s C-STOREs inline (at EVT_CONN_OPEN, before any P-DATA-TF is received). Returns False,
    changing nothing, when its DUL does not look like pynetdicom 3.0's."""
    dul = getattr(assoc, "dul", None)
    if not isinstance(dul, threading.Thread) or not hasattr(dul, "_recv_pdu"):
        return False
    inline = InlineStore()
    setattr(dul, _PREPARED, inline)
    provider: Any = dul
    provider._read_pdu_data = functools.partial(_read_pdu_data, dul, inline)  # shadows the method
    return True


def let_in(assoc: Any) -> None:
    """Serve ``assoc``'s C-STOREs inline from now on: the listener has let it in (EVT_ESTABLISHED)."""
    inline = inline_store_of(assoc)
    if inline is not None:
        inline.peer_let_in = True


def connection_closed(assoc: Any) -> None:
    """``assoc``'s connection is closed (EVT_CONN_CLOSE): a request cut off mid-data-set frees its buffer now
    (a spilled one holds a temporary file) rather than when the association is collected."""
    inline = inline_store_of(assoc)
    if inline is not None:
        inline.give_up()


def inline_store_of(assoc: Any) -> InlineStore | None:
    """The inline store of ``assoc``, if ``prepare`` gave it one."""
    inline = getattr(getattr(assoc, "dul", None), _PREPARED, None)
    return inline if isinstance(inline, InlineStore) else None
