"""What a peer sends on an association, followed PDU by PDU and message by message (PS3.8 9.3 and annex E).

``PduStreamMonitor`` is fed every byte received on one connection, in order, in chunks of any size. It reads
each PDU header and, inside P-DATA-TF PDUs, each presentation data value item header (length, presentation
context ID, message control header); the values themselves are only counted. It raises ``PeerProtocolError``
for what no conformant peer sends and what would cost the bridge unbounded memory:

- a PDU type that does not exist, or a PDU longer than its kind may be: a P-DATA-TF over the maximum length the
  bridge announced (``max_pdu_bytes``), an association PDU over ``MAX_ASSOCIATION_PDU_BYTES``, a release or
  abort PDU over ``MAX_CONTROL_PDU_BYTES``;
- a P-DATA-TF whose items do not exactly fill it;
- a data set fragment with no command before it, before its command's last fragment, or on another
  presentation context than its command (PS3.8 E.2: a message's fragments share one context);
- a command fragment while a data set is still being received;
- an A-RELEASE-RQ while a message's command or data set is still being received (a release cuts no message
  short: the peer is aborted, and the partial message dropped);
- a command set over ``MAX_COMMAND_BYTES`` (a real one is a few hundred bytes).

A data set over ``max_instance_bytes`` is not an error: ``discarding`` turns true and stays true until that
message's last fragment, so that the socket reading the stream can drop the rest (dicom/connection.py) while the
association goes on, and the C-STORE handler refuses the instance.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import struct

PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length of what follows
ITEM_HEADER = struct.Struct(">LBB")  # PDV item length, presentation context ID, message control header
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)
# An A-ASSOCIATE-RQ proposing 128 presentation contexts with 45 transfer syntaxes each is ~160 kB.
MAX_ASSOCIATION_PDU_BYTES = 256 * 1024
MAX_CONTROL_PDU_BYTES = 1024  # A-RELEASE-RQ/RP and A-ABORT have 4 bytes
MAX_COMMAND_BYTES = 64 * 1024
_COMMAND = 0x01  # message control header bits (PS3.8 E.2)
_LAST_FRAGMENT = 0x02
_ITEM_OVERHEAD = 2  # the context ID and the message control header, counted in the item length


class PeerProtocolError(Exception):
    """The peer sent something no conformant DICOM peer sends, or more than the bridge admits; the connection is
    closed. ``reason`` is a stable name for logs; the message says what was received and which limit it broke."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Phase(enum.Enum):
    IDLE = "idle"  # between messages
    COMMAND = "command"  # command fragments arriving
    AFTER_COMMAND = "after_command"  # the command is whole; a data set may follow
    DATA_SET = "data_set"  # data set fragments arriving


def pdu_limit(pdu_type: int, *, max_pdu_bytes: int) -> int | None:
    """The longest PDU of ``pdu_type`` admitted (its length field), or None for a type that does not exist."""
    if pdu_type == P_DATA_TF:
        return max_pdu_bytes
    if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ):
        return MAX_ASSOCIATION_PDU_BYTES
    if pdu_type in (A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
        return MAX_CONTROL_PDU_BYTES
    return None


def check_pdu_header(pdu_type: int, length: int, *, max_pdu_bytes: int) -> None:
    """Raise ``PeerProtocolError`` when a PDU of this type and length is not admitted."""
    limit = pdu_limit(pdu_type, max_pdu_bytes=max_pdu_bytes)
    if limit is None:
        raise PeerProtocolError("unknown_pdu_type", f"PDU type 0x{pdu_type:02X} does not exist (PS3.8 9.3)")
    if length > limit:
        if pdu_type == P_DATA_TF:
            raise PeerProtocolError(
                "pdu_too_large",
                f"P-DATA-TF PDU of {length} bytes, over the maximum length the bridge announced "
                f"(dicom.max_pdu_bytes: {max_pdu_bytes})",
            )
        raise PeerProtocolError("pdu_too_large", f"PDU type 0x{pdu_type:02X} of {length} bytes (at most {limit})")
    if pdu_type == P_DATA_TF and length < ITEM_HEADER.size:
        raise PeerProtocolError("invalid_pdu", f"P-DATA-TF PDU of {length} bytes holds no whole item")


class PduStreamMonitor:
    """One connection's received bytes, checked as they arrive; see the module docstring."""

    __slots__ = (
        "_command_bytes",
        "_context",
        "_data_set_bytes",
        "_discarding",
        "_item_header",
        "_item_is_command",
        "_item_is_last",
        "_item_remaining",
        "_max_instance_bytes",
        "_max_pdu_bytes",
        "_pdu_header",
        "_pdu_remaining",
        "_pdu_type",
        "_phase",
        "data_sets_received",
        "pdus_received",
    )

    def __init__(self, *, max_pdu_bytes: int, max_instance_bytes: int) -> None:
        self._max_pdu_bytes = max_pdu_bytes
        self._max_instance_bytes = max_instance_bytes
        self._pdu_header = bytearray()
        self._pdu_type = 0
        self._pdu_remaining = 0
        self._item_header = bytearray()
        self._item_remaining = 0
        self._item_is_command = False
        self._item_is_last = False
        self._phase = _Phase.IDLE
        self._context = -1
        self._command_bytes = 0
        self._data_set_bytes = 0
        self._discarding = False
        self.pdus_received = 0
        self.data_sets_received = 0  # messages whose data set's last fragment has arrived

    @property
    def at_pdu_boundary(self) -> bool:
        """Whether the next byte begins a PDU."""
        return not self._pdu_header and self._pdu_remaining == 0

    @property
    def in_message(self) -> bool:
        """Whether a PDU or a DIMSE message is partly received (a transfer is under way)."""
        return not self.at_pdu_boundary or self._phase in (_Phase.COMMAND, _Phase.DATA_SET)

    @property
    def message_unfinished(self) -> bool:
        """Whether the last message received may still expect a data set: its command has begun, and no data
        set's last fragment has arrived since (after a command without a data set, e.g. a C-ECHO's, too)."""
        return self._phase is not _Phase.IDLE

    @property
    def discarding(self) -> bool:
        """Whether the data set being received has passed ``max_instance_bytes`` and its last fragment has not
        arrived yet."""
        return self._discarding and self._phase is _Phase.DATA_SET

    @property
    def data_set_bytes(self) -> int:
        """Data set bytes received for the current (or last) message."""
        return self._data_set_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Follow ``data``, the next bytes received. Raises ``PeerProtocolError``."""
        position, end = 0, len(data)
        while position < end:
            if self._pdu_remaining == 0:
                wanted = PDU_HEADER.size - len(self._pdu_header)
                taken = min(wanted, end - position)
                self._pdu_header += data[position : position + taken]
                position += taken
                if len(self._pdu_header) == PDU_HEADER.size:
                    self._begin_pdu()
                continue
            taken = min(self._pdu_remaining, end - position)
            if self._pdu_type == P_DATA_TF:
                self._feed_items(data, position, taken)
            position += taken
            self._pdu_remaining -= taken
            if self._pdu_remaining == 0:
                self._end_pdu()

    def _begin_pdu(self) -> None:
        pdu_type, _reserved, length = PDU_HEADER.unpack(self._pdu_header)
        self._pdu_header.clear()
        check_pdu_header(pdu_type, length, max_pdu_bytes=self._max_pdu_bytes)
        if pdu_type == A_RELEASE_RQ and self._phase in (_Phase.COMMAND, _Phase.DATA_SET):
            raise PeerProtocolError(
                "message_out_of_order",
                f"an A-RELEASE-RQ arrived before the last {self._phase.value.replace('_', ' ')} fragment of a "
                "message; the partial message is dropped",
            )
        self._pdu_type = pdu_type
        self._pdu_remaining = length
        if length == 0:
            self._end_pdu()

    def _end_pdu(self) -> None:
        self.pdus_received += 1
        if self._pdu_type == P_DATA_TF and (self._item_header or self._item_remaining):
            raise PeerProtocolError("invalid_pdu", "a presentation data value item runs past the end of its PDU")

    def _feed_items(self, data: bytes | bytearray | memoryview, position: int, count: int) -> None:
        end = position + count
        while position < end:
            if self._item_remaining == 0:
                wanted = ITEM_HEADER.size - len(self._item_header)
                taken = min(wanted, end - position)
                self._item_header += data[position : position + taken]
                position += taken
                if len(self._item_header) == ITEM_HEADER.size:
                    # What the PDU still holds after this item's header.
                    self._begin_item(pdu_left=self._pdu_remaining - (position - (end - count)))
                continue
            taken = min(self._item_remaining, end - position)
            self._item_data(taken)
            position += taken
            self._item_remaining -= taken
            if self._item_remaining == 0:
                self._end_item()

    def _begin_item(self, *, pdu_left: int) -> None:
        length, context_id, control = ITEM_HEADER.unpack(self._item_header)
        self._item_header.clear()
        if length < _ITEM_OVERHEAD or length - _ITEM_OVERHEAD > pdu_left:
            raise PeerProtocolError(
                "invalid_pdu", f"presentation data value item of length {length} does not fit its PDU"
            )
        is_command = bool(control & _COMMAND)
        if is_command:
            self._begin_command_fragment(context_id)
        else:
            self._begin_data_set_fragment(context_id)
        self._item_is_command = is_command
        self._item_is_last = bool(control & _LAST_FRAGMENT)
        self._item_remaining = length - _ITEM_OVERHEAD
        if self._item_remaining == 0:
            self._end_item()

    def _begin_command_fragment(self, context_id: int) -> None:
        if self._phase is _Phase.DATA_SET:
            raise PeerProtocolError(
                "message_out_of_order", "a command fragment arrived before the previous data set's last fragment"
            )
        if self._phase is _Phase.COMMAND:
            if context_id != self._context:
                raise PeerProtocolError(
                    "context_mismatch",
                    f"command fragments on presentation contexts {self._context} and {context_id}",
                )
            return
        self._phase = _Phase.COMMAND
        self._context = context_id
        self._command_bytes = 0
        self._data_set_bytes = 0
        self._discarding = False

    def _begin_data_set_fragment(self, context_id: int) -> None:
        if self._phase in (_Phase.IDLE, _Phase.COMMAND):
            raise PeerProtocolError(
                "message_out_of_order",
                "a data set fragment arrived before its command's last fragment"
                if self._phase is _Phase.COMMAND
                else "a data set fragment arrived without a command",
            )
        if context_id != self._context:
            raise PeerProtocolError(
                "context_mismatch",
                f"data set fragment on presentation context {context_id}, its command on {self._context}",
            )
        self._phase = _Phase.DATA_SET

    def _item_data(self, count: int) -> None:
        if self._item_is_command:
            self._command_bytes += count
            if self._command_bytes > MAX_COMMAND_BYTES:
                raise PeerProtocolError(
                    "command_too_large", f"a command set of over {MAX_COMMAND_BYTES} bytes (a real one has hundreds)"
                )
            return
        self._data_set_bytes += count
        if self._data_set_bytes > self._max_instance_bytes:
            self._discarding = True

    def _end_item(self) -> None:
        if not self._item_is_last:
            return
        if self._item_is_command:
            self._phase = _Phase.AFTER_COMMAND
        else:
            self._phase = _Phase.IDLE
            self.data_sets_received += 1
