"""Fuzz the listener's decoding and extraction with hypothesis: whatever bytes arrive as a C-STORE dataset,
read_header + extract_instance give a record with valid UIDs or raise InvalidInstanceError (0xC000), never
anything else (which the listener would answer 0x0110 and log as our bug). Bounded: a fixed number of
examples, no example database written to the tree."""

from __future__ import annotations

import re
from io import BytesIO

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.errors import InvalidInstanceError
from tests.support.studies import make_dataset

UID_SHAPE = re.compile(r"[0-9]+(\.[0-9]+)*")
FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def encoded(transfer_syntax: str) -> bytes:
    syntax = UID(transfer_syntax)
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(stream, make_dataset())
    return stream.getvalue()


SOURCES = {syntax: encoded(syntax) for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid dataset's bytes with a few random overwrites, insertions, deletions, and maybe truncated."""
    syntax = draw(st.sampled_from(sorted(SOURCES)))
    data = bytearray(SOURCES[syntax])
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if action == "overwrite":
            data[at : at + len(chunk)] = chunk
        elif action == "insert":
            data[at:at] = chunk
        else:
            del data[at : at + len(chunk)]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return syntax, bytes(data)


@FUZZ
@given(mutated())
def test_any_mutated_dataset_gives_a_valid_record_or_invalid_instance_error(case: tuple[str, bytes]) -> None:
    """A record has UIDs of digits and dots, at most 64 characters; every refusal is InvalidInstanceError."""
    syntax, data = case
    try:
        record = extract_instance(read_header(BytesIO(data), UID(syntax)))
    except InvalidInstanceError:
        return
    for value in (record.study.study_uid, record.series.series_uid, record.sop_instance_uid, record.sop_class_uid):
        assert len(value) <= 64 and UID_SHAPE.fullmatch(value), value


@FUZZ
@given(st.binary(max_size=512), st.sampled_from(sorted(SOURCES)))
def test_random_bytes_never_raise_anything_but_invalid_instance_error(data: bytes, syntax: str) -> None:
    """Bytes that were never DICOM: refused as InvalidInstanceError, or (rarely) a record with valid UIDs."""
    try:
        record = extract_instance(read_header(BytesIO(data), UID(syntax)))
    except InvalidInstanceError:
        return
    assert UID_SHAPE.fullmatch(record.study.study_uid)
