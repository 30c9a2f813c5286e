"""What an A-ASSOCIATE-RQ must be before pynetdicom sees it (PS3.8 9.3.2, PS3.7 annex D), and the answer to
one that is not.

pynetdicom trusts the structure of the request it decodes: a presentation context without a transfer syntax
sub-item, or with an even context ID, kills the thread negotiating the association (its connection stays open),
and a peer announcing a maximum length of a few bytes gets its instance stored and then an exception where its
response should be. The front door (dicom/front_door.py) therefore checks each whole request here and refuses,
at once, what no conformant peer sends or what the bridge cannot serve:

- **Malformed** (A-ABORT, source service provider, PS3.8 9.3.8): items or sub-items that do not exactly fill
  what holds them; an item or sub-item type PS3.8 and PS3.7 do not define (reason 4, unrecognised PDU
  parameter); not exactly one application context item and one user information item, no presentation context,
  a presentation context whose ID is even, 0 or repeated, that has not exactly one abstract syntax or has no
  transfer syntax; a UID that is empty, over 64 characters or holds anything but digits and dots; a sub-item
  whose fixed length is wrong (reason 6, invalid PDU parameter value).
- **Well-formed, but not served** (A-ASSOCIATE-RJ, permanent): a Maximum Length (sub-item 0x51) from 1 to
  ``MIN_PEER_MAXIMUM_LENGTH`` - 1, too small to carry a response in one PDU (service provider, ACSE related,
  no reason given); a presentation context proposing over ``MAX_TRANSFER_SYNTAXES_PER_CONTEXT`` transfer
  syntaxes, or more role selection or extended negotiation sub-items than there can be presentation contexts
  (service provider, presentation related, local limit exceeded); a called or calling AE title that is blank
  or holds a character an AE title cannot hold (service user, called or calling AE title not recognised).

The rest (application context name, protocol version, AE titles against the configuration, abstract and
transfer syntaxes against what the listener supports) is pynetdicom's to answer, as it does correctly.

A request that passes is summarised (``RequestSummary``) so that the front door can log one line for it
instead of pynetdicom's warning per unknown transfer syntax UID. Values quoted from the request in a refusal's
``detail`` are cut to ``QUOTED_CHARS`` characters.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.uid import UID

from pacs_bridge.dicom.pdu_stream import A_ABORT, A_ASSOCIATE_RJ, PDU_HEADER

# IDs are odd numbers from 1 to 255, each used once: there cannot be more presentation contexts than this.
MAX_PRESENTATION_CONTEXTS = 128
# pynetdicom's ALL_TRANSFER_SYNTAXES (3.0) holds 45, and a sender proposing all of them is legitimate.
MAX_TRANSFER_SYNTAXES_PER_CONTEXT = 64
# A C-STORE response command set of the bridge is under 400 bytes; implementations announce kilobytes.
MIN_PEER_MAXIMUM_LENGTH = 1024
MAX_UID_CHARS = 64
MAX_IMPLEMENTATION_VERSION_NAME_BYTES = 16
QUOTED_CHARS = 64

_ITEM = struct.Struct(">BBH")  # item type, reserved, item length
_FIXED_FIELDS = 68  # protocol version, reserved, called AE, calling AE, reserved: before the variable items
_CALLED_AE, _CALLING_AE = slice(4, 20), slice(20, 36)  # within the fixed fields
_APPLICATION_CONTEXT, _PRESENTATION_CONTEXT, _USER_INFORMATION = 0x10, 0x20, 0x50
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX = 0x30, 0x40
_MAXIMUM_LENGTH, _IMPLEMENTATION_CLASS_UID, _ASYNCHRONOUS_OPERATIONS = 0x51, 0x52, 0x53
_ROLE_SELECTION, _IMPLEMENTATION_VERSION_NAME, _EXTENDED_NEGOTIATION = 0x54, 0x55, 0x56
_COMMON_EXTENDED_NEGOTIATION, _USER_IDENTITY = 0x57, 0x58
_UID = re.compile(rb"[0-9.]{1,64}")
_AE_TITLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]+")  # default character repertoire without backslash (PS3.5)

# A-ABORT reasons (source 2, service provider; PS3.8 table 9-26)
_UNRECOGNIZED_PARAMETER, _INVALID_PARAMETER = 0x04, 0x06
# A-ASSOCIATE-RJ (PS3.8 table 9-21): result 1 permanent; (source, reason)
_PERMANENT = 0x01
_CALLING_AE_NOT_RECOGNIZED, _CALLED_AE_NOT_RECOGNIZED = (0x01, 0x03), (0x01, 0x07)
_ACSE_NO_REASON = (0x02, 0x01)
_LOCAL_LIMIT_EXCEEDED = (0x03, 0x02)


@dataclass(frozen=True, slots=True)
class RequestRefusal:
    """Why a request is refused, and the PDU that answers it."""

    reason: str  # a stable name for logs
    detail: str  # what was wrong, quoting at most QUOTED_CHARS characters of any value the peer sent
    answer: bytes  # an A-ABORT or A-ASSOCIATE-RJ PDU

    @property
    def answer_name(self) -> str:
        return "A-ABORT" if self.answer[0] == A_ABORT else "A-ASSOCIATE-RJ"


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """A request that passed: what it proposes, in a few numbers."""

    presentation_contexts: int
    transfer_syntaxes: int  # over all presentation contexts
    unknown_transfer_syntaxes: int  # of those, UIDs the DICOM standard does not define as transfer syntaxes
    first_unknown_transfer_syntax: str  # quoted as a refusal quotes ("" when there is none)


class _Refused(Exception):
    def __init__(self, refusal: RequestRefusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


def _malformed(reason: str, detail: str, *, abort_reason: int = _INVALID_PARAMETER) -> _Refused:
    answer = PDU_HEADER.pack(A_ABORT, 0, 4) + bytes([0, 0, 0x02, abort_reason])
    return _Refused(RequestRefusal(reason, detail, answer))


def _rejected(reason: str, detail: str, source_reason: tuple[int, int]) -> _Refused:
    source, diagnostic = source_reason
    answer = PDU_HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes([0, _PERMANENT, source, diagnostic])
    return _Refused(RequestRefusal(reason, detail, answer))


def quote(value: bytes | str) -> str:
    """``value`` as text for a log line, cut to ``QUOTED_CHARS`` characters (its full length said)."""
    text = value.decode("ascii", "backslashreplace") if isinstance(value, bytes) else value
    if len(text) <= QUOTED_CHARS:
        return text
    return f"{text[:QUOTED_CHARS]}... ({len(value)} {'bytes' if isinstance(value, bytes) else 'characters'})"


def check_association_request(pdu: bytes | bytearray | memoryview) -> RequestRefusal | RequestSummary:
    """Check a whole A-ASSOCIATE-RQ PDU (its 6-byte header included); see the module docstring."""
    try:
        return _check(bytes(pdu))
    except _Refused as refused:
        return refused.refusal


def _check(pdu: bytes) -> RequestSummary:
    length = PDU_HEADER.unpack_from(pdu)[2] if len(pdu) >= PDU_HEADER.size else -1
    if length != len(pdu) - PDU_HEADER.size:
        raise _malformed("invalid_request", f"an A-ASSOCIATE-RQ whose length field says {length} bytes")
    body = pdu[PDU_HEADER.size :]
    if len(body) < _FIXED_FIELDS:
        raise _malformed("invalid_request", f"an A-ASSOCIATE-RQ of {len(body)} bytes, shorter than its fixed fields")
    for field, reason, source_reason in (
        (_CALLED_AE, "invalid_called_ae_title", _CALLED_AE_NOT_RECOGNIZED),
        (_CALLING_AE, "invalid_calling_ae_title", _CALLING_AE_NOT_RECOGNIZED),
    ):
        title = body[field]
        if _AE_TITLE.fullmatch(title.rstrip(b"\x00")) is None or not title.strip(b" \x00"):
            which = "called" if field is _CALLED_AE else "calling"
            raise _rejected(
                reason, f"{which} AE title {quote(title)!r} is blank or not in the AE repertoire", source_reason
            )
    counts = {_APPLICATION_CONTEXT: 0, _PRESENTATION_CONTEXT: 0, _USER_INFORMATION: 0}
    context_ids: set[int] = set()
    transfer_syntaxes = unknown = 0
    first_unknown = ""
    for item_type, value in _items(body[_FIXED_FIELDS:], "variable item"):
        if item_type not in counts:
            raise _malformed(
                "unknown_item",
                f"item type 0x{item_type:02X} is not an A-ASSOCIATE-RQ item (PS3.8 9.3.2)",
                abort_reason=_UNRECOGNIZED_PARAMETER,
            )
        counts[item_type] += 1
        if item_type == _APPLICATION_CONTEXT:
            _uid(value, "application context name")
        elif item_type == _PRESENTATION_CONTEXT:
            proposed = _presentation_context(value, context_ids)
            transfer_syntaxes += len(proposed)
            for transfer_syntax in proposed:
                if not _is_transfer_syntax(transfer_syntax):
                    unknown += 1
                    first_unknown = first_unknown or quote(transfer_syntax)
        else:
            _user_information(value)
    if counts[_APPLICATION_CONTEXT] != 1 or counts[_USER_INFORMATION] != 1 or not counts[_PRESENTATION_CONTEXT]:
        raise _malformed(
            "invalid_request",
            f"{counts[_APPLICATION_CONTEXT]} application context, {counts[_PRESENTATION_CONTEXT]} presentation "
            f"context and {counts[_USER_INFORMATION]} user information items (PS3.8 9.3.2: one, one or more, one)",
        )
    return RequestSummary(len(context_ids), transfer_syntaxes, unknown, first_unknown)


@functools.lru_cache(maxsize=1024)  # senders propose the same few UIDs, in every context of every request
def _is_transfer_syntax(uid: str) -> bool:
    return UID(uid).type == "Transfer Syntax"


def _items(data: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    """The (type, value) of each item or sub-item in ``data``, which they must fill exactly."""
    position, end = 0, len(data)
    while position < end:
        if end - position < _ITEM.size:
            raise _malformed("invalid_item", f"{end - position} bytes left where a {what} header of 4 should be")
        item_type, _reserved, length = _ITEM.unpack_from(data, position)
        position += _ITEM.size
        if length > end - position:
            raise _malformed(
                "invalid_item",
                f"{what} type 0x{item_type:02X} of {length} bytes runs {length - (end - position)} bytes past "
                "what holds it",
            )
        yield item_type, data[position : position + length]
        position += length


def _uid(value: bytes, what: str) -> str:
    text = value.rstrip(b"\x00 ")
    if _UID.fullmatch(text) is None:
        problem = "empty" if not text else f"over {MAX_UID_CHARS} characters" if len(text) > MAX_UID_CHARS else None
        raise _malformed(
            "invalid_uid", f"{what} {quote(value)!r} is {problem or 'not made of digits and dots'} (PS3.5 9.1)"
        )
    return text.decode("ascii")


def _presentation_context(value: bytes, seen_ids: set[int]) -> list[str]:
    """The transfer syntaxes a presentation context item proposes, once it is checked."""
    if len(value) < 4:
        raise _malformed("invalid_presentation_context", f"a presentation context item of {len(value)} bytes")
    context_id = value[0]
    if context_id % 2 == 0:
        raise _malformed(
            "invalid_presentation_context", f"presentation context ID {context_id} is not odd (PS3.8 9.3.2.2)"
        )
    if context_id in seen_ids:
        raise _malformed("invalid_presentation_context", f"presentation context ID {context_id} is proposed twice")
    seen_ids.add(context_id)
    abstract_syntaxes: list[str] = []
    transfer_syntaxes: list[str] = []
    for sub_item_type, sub_value in _items(value[4:], "presentation context sub-item"):
        if sub_item_type == _ABSTRACT_SYNTAX:
            abstract_syntaxes.append(_uid(sub_value, "abstract syntax"))
        elif sub_item_type == _TRANSFER_SYNTAX:
            if len(transfer_syntaxes) == MAX_TRANSFER_SYNTAXES_PER_CONTEXT:
                raise _rejected(
                    "too_many_transfer_syntaxes",
                    f"presentation context {context_id} proposes over {MAX_TRANSFER_SYNTAXES_PER_CONTEXT} "
                    "transfer syntaxes",
                    _LOCAL_LIMIT_EXCEEDED,
                )
            transfer_syntaxes.append(_uid(sub_value, "transfer syntax"))
        else:
            raise _malformed(
                "unknown_item",
                f"sub-item type 0x{sub_item_type:02X} in presentation context {context_id} (PS3.8 9.3.2.2)",
                abort_reason=_UNRECOGNIZED_PARAMETER,
            )
    if len(abstract_syntaxes) != 1 or not transfer_syntaxes:
        raise _malformed(
            "invalid_presentation_context",
            f"presentation context {context_id} has {len(abstract_syntaxes)} abstract syntax and "
            f"{len(transfer_syntaxes)} transfer syntax sub-items (PS3.8 9.3.2.2: one, and one or more)",
        )
    return transfer_syntaxes


def _user_information(value: bytes) -> None:
    seen: dict[int, int] = {}
    for sub_item_type, sub_value in _items(value, "user information sub-item"):
        seen[sub_item_type] = seen.get(sub_item_type, 0) + 1
        if sub_item_type == _MAXIMUM_LENGTH:
            _maximum_length(sub_value)
        elif sub_item_type == _IMPLEMENTATION_CLASS_UID:
            _uid(sub_value, "implementation class UID")
        elif sub_item_type == _IMPLEMENTATION_VERSION_NAME:
            if not 1 <= len(sub_value) <= MAX_IMPLEMENTATION_VERSION_NAME_BYTES:
                raise _malformed(
                    "invalid_user_information",
                    f"an implementation version name of {len(sub_value)} bytes (PS3.7 D.3.3.2: 1 to 16)",
                )
        elif sub_item_type == _ASYNCHRONOUS_OPERATIONS:
            _fixed_length(sub_value, 4, "asynchronous operations window")
        elif sub_item_type == _ROLE_SELECTION:
            _uid(_length_prefixed(sub_value, "SCP/SCU role selection", trailing=2), "role selection SOP class")
        elif sub_item_type == _EXTENDED_NEGOTIATION:
            _uid(_length_prefixed(sub_value, "SOP class extended negotiation"), "extended negotiation SOP class")
        elif sub_item_type == _COMMON_EXTENDED_NEGOTIATION:
            _uid(_length_prefixed(sub_value, "SOP class common extended negotiation"), "common extended SOP class")
        elif sub_item_type == _USER_IDENTITY:
            _user_identity(sub_value)
        else:
            raise _malformed(
                "unknown_item",
                f"user information sub-item type 0x{sub_item_type:02X} (PS3.7 annex D)",
                abort_reason=_UNRECOGNIZED_PARAMETER,
            )
    for sub_item_type, what in (
        (_MAXIMUM_LENGTH, "maximum length"),
        (_IMPLEMENTATION_CLASS_UID, "implementation class UID"),
    ):
        if seen.get(sub_item_type, 0) > 1:
            raise _malformed("invalid_user_information", f"{seen[sub_item_type]} {what} sub-items")
    for sub_item_type, what in (
        (_ROLE_SELECTION, "SCP/SCU role selection"),
        (_EXTENDED_NEGOTIATION, "SOP class extended negotiation"),
        (_COMMON_EXTENDED_NEGOTIATION, "SOP class common extended negotiation"),
    ):
        if seen.get(sub_item_type, 0) > MAX_PRESENTATION_CONTEXTS:
            raise _rejected(
                "too_many_negotiation_items",
                f"{seen[sub_item_type]} {what} sub-items (at most one per presentation context: "
                f"{MAX_PRESENTATION_CONTEXTS})",
                _LOCAL_LIMIT_EXCEEDED,
            )


def _maximum_length(value: bytes) -> None:
    _fixed_length(value, 4, "maximum length")
    maximum = int.from_bytes(value, "big")
    if 0 < maximum < MIN_PEER_MAXIMUM_LENGTH:
        raise _rejected(
            "maximum_length_too_small",
            f"the peer's maximum PDU length of {maximum} bytes cannot carry a response in one PDU "
            f"(at least {MIN_PEER_MAXIMUM_LENGTH}, or 0 for no limit)",
            _ACSE_NO_REASON,
        )


def _fixed_length(value: bytes, length: int, what: str) -> None:
    if len(value) != length:
        raise _malformed("invalid_user_information", f"a {what} sub-item of {len(value)} bytes ({length} expected)")


def _length_prefixed(value: bytes, what: str, *, trailing: int | None = None) -> bytes:
    """The UID a sub-item starts with (2-byte length, then the UID); with ``trailing``, exactly that many bytes
    must follow it."""
    if len(value) < 2:
        raise _malformed("invalid_user_information", f"a {what} sub-item of {len(value)} bytes")
    uid_length = int.from_bytes(value[:2], "big")
    rest = len(value) - 2 - uid_length
    if rest < 0 or (trailing is not None and rest != trailing):
        raise _malformed(
            "invalid_user_information", f"a {what} sub-item of {len(value)} bytes naming a UID of {uid_length}"
        )
    return value[2 : 2 + uid_length]


def _user_identity(value: bytes) -> None:
    """PS3.7 D.3.3.7.1: type, positive-response-requested, then two length-prefixed fields filling the rest."""
    if len(value) < 4:
        raise _malformed("invalid_user_information", f"a user identity sub-item of {len(value)} bytes")
    primary = int.from_bytes(value[2:4], "big")
    secondary_at = 4 + primary
    if len(value) < secondary_at + 2 or len(value) != secondary_at + 2 + int.from_bytes(
        value[secondary_at : secondary_at + 2], "big"
    ):
        raise _malformed(
            "invalid_user_information",
            f"a user identity sub-item of {len(value)} bytes whose field lengths do not fill it",
        )
