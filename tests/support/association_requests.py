"""Raw upper-layer PDUs (PS3.8 9.3) for tests that play a broken or hostile peer: A-ASSOCIATE-RQs built item by
item, P-DATA-TF and A-RELEASE-RQ PDUs, and reading one PDU back."""

from __future__ import annotations

import socket
import struct

CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def item(item_type: int, value: bytes) -> bytes:
    """An item or sub-item: type, reserved, 2-byte length, value."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def presentation_context(
    context_id: int,
    abstract_syntax: bytes | None = CT_IMAGE_STORAGE,
    transfer_syntaxes: tuple[bytes, ...] | list[bytes] = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN),
) -> bytes:
    """A presentation context item (0x20); ``abstract_syntax`` None leaves its sub-item out."""
    sub_items = b"" if abstract_syntax is None else item(0x30, abstract_syntax)
    sub_items += b"".join(item(0x40, uid) for uid in transfer_syntaxes)
    return item(0x20, bytes([context_id, 0, 0, 0]) + sub_items)


def user_information(
    maximum_length: int = 16384, implementation_class_uid: bytes = b"1.2.826.0.1.3680043.9.7.1", extra: bytes = b""
) -> bytes:
    """A user information item (0x50): maximum length, implementation class UID, then ``extra`` sub-items."""
    return item(0x50, item(0x51, struct.pack(">I", maximum_length)) + item(0x52, implementation_class_uid) + extra)


def associate_rq(
    contexts: list[bytes] | None = None,
    user_info: bytes | None = None,
    *,
    called: str = "PACS_BRIDGE",
    calling: str = "HOSTILE",
) -> bytes:
    """A whole A-ASSOCIATE-RQ PDU: one CT context and a 16 kB maximum length unless told otherwise."""
    variable = item(0x10, APPLICATION_CONTEXT)
    variable += b"".join([presentation_context(1)] if contexts is None else contexts)
    variable += user_information() if user_info is None else user_info
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + b"\0" * 32 + variable
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data_tf(context_id: int, control: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value (``control``: the message control header)."""
    pdv = struct.pack(">LBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = struct.pack(">BBL", 0x05, 0, 4) + b"\0" * 4


def read_pdu(connection: socket.socket, *, timeout: float) -> tuple[int, bytes] | None:
    """The next PDU the peer sends, as (type, body), or None when it closes the connection first."""
    connection.settimeout(timeout)
    header = _read(connection, 6)
    if header is None:
        return None
    pdu_type, _reserved, length = struct.unpack(">BBL", header)
    body = _read(connection, length)
    return None if body is None else (pdu_type, body)


def _read(connection: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        try:
            part = connection.recv(count - len(data))
        except ConnectionResetError:
            return None
        if not part:
            return None
        data += part
    return data


def closed_by_peer(connection: socket.socket, *, timeout: float) -> bool:
    """Whether the other end closes ``connection`` within ``timeout`` (EOF or reset), reading what comes first."""
    connection.settimeout(timeout)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def _command_element(element: int, value: bytes | int) -> bytes:
    encoded = struct.pack("<H", value) if isinstance(value, int) else value + b"\0" * (len(value) % 2)
    return struct.pack("<HHI", 0x0000, element, len(encoded)) + encoded


def c_store_command(sop_instance_uid: bytes, *, leave_out: tuple[int, ...] = ()) -> bytes:
    """The command set of a C-STORE-RQ for a CT image with a data set (implicit VR little endian, PS3.7 9.3.1.1),
    without the elements numbered in ``leave_out`` (e.g. 0x1000, the Affected SOP Instance UID)."""
    elements = {
        0x0002: CT_IMAGE_STORAGE,
        0x0100: 0x0001,  # C-STORE-RQ
        0x0110: 1,  # message ID
        0x0700: 0,  # priority
        0x0800: 0x0000,  # a data set follows
        0x1000: sop_instance_uid,
    }
    body = b"".join(_command_element(number, value) for number, value in elements.items() if number not in leave_out)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body
