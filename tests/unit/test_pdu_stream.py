"""The received byte stream, checked PDU by PDU and message by message (dicom/pdu_stream.py)."""

from __future__ import annotations

import struct

import pytest

from pacs_bridge.dicom.pdu_stream import (
    MAX_COMMAND_BYTES,
    PduStreamMonitor,
    PeerProtocolError,
)

COMMAND, LAST = 0x01, 0x02


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(context_id: int, control: int, data: bytes) -> bytes:
    """A presentation data value item: length, context ID, message control header, fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*items: bytes) -> bytes:
    return pdu(0x04, b"".join(items))


def monitor(max_pdu_bytes: int = 16384, max_instance_bytes: int = 1000) -> PduStreamMonitor:
    return PduStreamMonitor(max_pdu_bytes=max_pdu_bytes, max_instance_bytes=max_instance_bytes)


def fed(stream: bytes, watcher: PduStreamMonitor, *, chunk: int) -> PduStreamMonitor:
    for start in range(0, len(stream), chunk):
        watcher.feed(stream[start : start + chunk])
    return watcher


STORE = p_data(item(1, COMMAND | LAST, b"c" * 80)) + p_data(item(1, 0, b"d" * 300), item(1, LAST, b"d" * 200))
RELEASE_RQ = pdu(0x05, b"\0\0\0\0")


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 64, 100_000])
def test_a_c_store_and_a_release_pass_in_chunks_of_any_size(chunk: int) -> None:
    """The same stream cut anywhere (inside headers too) is followed the same way."""
    watcher = fed(pdu(0x01, b"q" * 68) + STORE + RELEASE_RQ, monitor(), chunk=chunk)
    assert (watcher.pdus_received, watcher.data_sets_received) == (4, 1)
    assert watcher.at_pdu_boundary and not watcher.in_message and not watcher.discarding
    assert watcher.data_set_bytes == 500


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        # a PDU type PS3.8 does not define
        (pdu(0x08, b""), "unknown_pdu_type"),
        # a P-DATA-TF longer than the announced maximum (16384), refused from its header alone
        (struct.pack(">BBL", 0x04, 0, 16385), "pdu_too_large"),
        # an A-ASSOCIATE-RQ announcing 1 MiB
        (struct.pack(">BBL", 0x01, 0, 1 << 20), "pdu_too_large"),
        # an A-RELEASE-RQ that is not 4 bytes but 2 kB
        (pdu(0x05, b"\0" * 2048), "pdu_too_large"),
        # a P-DATA-TF too short to hold an item
        (pdu(0x04, b"\0\0\0\1"), "invalid_pdu"),
        # an item announcing more than its PDU holds
        (pdu(0x04, struct.pack(">LBB", 500, 1, COMMAND | LAST) + b"x" * 10), "invalid_pdu"),
        # a data set fragment with no command before it
        (p_data(item(1, LAST, b"d")), "message_out_of_order"),
        # a data set fragment before the command's last fragment
        (p_data(item(1, COMMAND, b"c"), item(1, LAST, b"d")), "message_out_of_order"),
        # a data set on another presentation context than its command (PS3.8 E.2)
        (p_data(item(1, COMMAND | LAST, b"c")) + p_data(item(3, LAST, b"d")), "context_mismatch"),
        # the fragments of one command on two contexts
        (p_data(item(1, COMMAND, b"c"), item(3, COMMAND | LAST, b"c")), "context_mismatch"),
        # a new command while a data set is still arriving
        (
            p_data(item(1, COMMAND | LAST, b"c"), item(1, 0, b"d"), item(1, COMMAND | LAST, b"c")),
            "message_out_of_order",
        ),
        # a command set of 64 kB and more, in fragments
        (b"".join(p_data(item(1, COMMAND, b"c" * 8000)) for _ in range(9)), "command_too_large"),
        # a release in the middle of a data set (the partial message would be dropped without a word)
        (p_data(item(1, COMMAND | LAST, b"c"), item(1, 0, b"d")) + RELEASE_RQ, "message_out_of_order"),
        # a release in the middle of a command
        (p_data(item(1, COMMAND, b"c")) + RELEASE_RQ, "message_out_of_order"),
    ],
)
def test_what_no_conformant_peer_sends_is_refused_naming_it(stream: bytes, reason: str) -> None:
    with pytest.raises(PeerProtocolError) as raised:
        fed(stream, monitor(), chunk=7)
    assert raised.value.reason == reason


def test_the_pdu_limit_names_the_key_that_sets_it() -> None:
    with pytest.raises(PeerProtocolError, match=r"dicom\.max_pdu_bytes: 16384"):
        monitor().feed(struct.pack(">BBL", 0x04, 0, 20000))


def test_a_command_set_just_under_the_limit_passes() -> None:
    watcher = fed(p_data(item(1, COMMAND | LAST, b"c" * (MAX_COMMAND_BYTES - 1))), monitor(1 << 20), chunk=4096)
    assert not watcher.in_message


def test_a_data_set_over_the_instance_limit_is_marked_for_discarding_until_its_last_fragment() -> None:
    watcher = monitor(max_instance_bytes=1000)
    watcher.feed(p_data(item(1, COMMAND | LAST, b"c" * 80)))
    watcher.feed(p_data(item(1, 0, b"d" * 1000)))
    assert not watcher.discarding  # exactly at the limit
    watcher.feed(p_data(item(1, 0, b"d")))
    assert watcher.discarding and watcher.in_message
    watcher.feed(p_data(item(1, 0, b"d" * 5000)))
    assert watcher.discarding
    watcher.feed(p_data(item(1, LAST, b"d")))
    assert not watcher.discarding and not watcher.in_message
    assert (watcher.data_set_bytes, watcher.data_sets_received) == (6002, 1)
    watcher.feed(STORE)  # the next instance starts afresh
    assert (watcher.data_set_bytes, watcher.data_sets_received, watcher.discarding) == (500, 2, False)


def test_a_message_is_under_way_from_its_first_byte_to_its_data_sets_last() -> None:
    watcher = monitor()
    watcher.feed(STORE[:3])
    assert watcher.in_message and not watcher.at_pdu_boundary  # inside a PDU header
    command_pdu_length = 6 + 6 + 80
    watcher.feed(STORE[3:command_pdu_length])
    assert not watcher.in_message  # a whole command: a C-ECHO would be complete here
    watcher.feed(STORE[command_pdu_length : command_pdu_length + 20])
    assert watcher.in_message
    watcher.feed(STORE[command_pdu_length + 20 :])
    assert not watcher.in_message


def test_a_release_after_a_whole_message_passes() -> None:
    """After a data set's last fragment, or after a command without a data set (a C-ECHO), a release is in order."""
    fed(STORE + RELEASE_RQ, monitor(), chunk=7)
    fed(p_data(item(1, COMMAND | LAST, b"e")) + RELEASE_RQ, monitor(), chunk=7)
