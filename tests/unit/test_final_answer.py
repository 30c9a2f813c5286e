"""SentPdus: which PDU the bridge sent last is read from the bytes it sends, however they are split."""

from __future__ import annotations

import struct

import pytest

from pacs_bridge.dicom.final_answer import SentPdus


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


ASSOCIATE_AC = pdu(0x02, b"\0" * 180)
P_DATA = pdu(0x04, b"\0" * 300)
ASSOCIATE_RJ = pdu(0x03, b"\0\x01\x01\x07")
RELEASE_RP = pdu(0x06, b"\0" * 4)
ABORT = pdu(0x07, b"\0\0\x02\x00")


@pytest.mark.parametrize("last_word", [ASSOCIATE_RJ, RELEASE_RP, ABORT])
def test_a_refusal_release_or_abort_sent_whole_is_the_last_word(last_word: bytes) -> None:
    sent = SentPdus()
    sent.sent(last_word)
    assert sent.last_word == last_word[0]


def test_an_accept_and_data_are_not() -> None:
    sent = SentPdus()
    sent.sent(ASSOCIATE_AC + P_DATA + P_DATA)
    assert sent.last_word is None


def test_a_last_word_is_seen_only_once_sent_whole_even_one_byte_at_a_time() -> None:
    sent = SentPdus()
    stream = ASSOCIATE_AC + P_DATA + ABORT
    for position in range(len(stream) - 1):
        sent.sent(stream[position : position + 1])
        assert sent.last_word is None, position
    sent.sent(stream[-1:])
    assert sent.last_word == 0x07


def test_a_p_data_body_that_looks_like_an_abort_is_not_one() -> None:
    sent = SentPdus()
    sent.sent(pdu(0x04, ABORT + ABORT))
    assert sent.last_word is None
