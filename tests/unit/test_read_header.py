"""read_header refuses a dataset cut short inside a value, whatever is left of it, and a header that would cost
more than any real modality's (header.HeaderWalk)."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_bridge.dicom.header import MAX_HEADER_DEPTH, MAX_HEADER_ENTRIES, MAX_HEADER_VALUE_BYTES, read_header
from pacs_bridge.errors import InvalidInstanceError
from tests.support.studies import make_dataset


def encoded_without_numbers() -> bytes:
    """The minimal CT dataset, Explicit VR LE, ending with its Series Instance UID (…1482.2.1, 32 bytes)."""
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(stream, make_dataset(SeriesNumber=None, InstanceNumber=None))
    return stream.getvalue()


# cut 3 and 5 leave "…1482.2" and "…1482": valid UIDs of a series that does not exist
@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5])
def test_dataset_ending_inside_the_series_uid_is_refused_naming_it(cut: int) -> None:
    """Never a shorter UID: InvalidInstanceError naming SeriesInstanceUID and the bytes missing."""
    data = encoded_without_numbers()
    with pytest.raises(InvalidInstanceError) as refused:
        read_header(BytesIO(data[:-cut]), UID(ExplicitVRLittleEndian))
    assert str(refused.value).startswith("SeriesInstanceUID (0020,000E): truncated")
    assert f"({32 - cut} of 32 bytes)" in str(refused.value)


def test_complete_dataset_is_read() -> None:
    """The same bytes uncut give the whole header."""
    header = read_header(BytesIO(encoded_without_numbers()), UID(ExplicitVRLittleEndian))
    assert header.SeriesInstanceUID == make_dataset().SeriesInstanceUID


def test_an_element_whose_vr_dicom_does_not_define_is_refused_naming_it() -> None:
    """Study Date sent with the VR bytes "D\\0" and length 0 (a fuzzer's find; its value's bytes follow as garbage):
    refused naming the element, never pydicom's NotImplementedError (which the listener would answer 0x0110, a
    failure of its own)."""
    data = encoded_without_numbers()
    study_date = data.index(b"\x08\x00\x20\x00DA")
    garbled = data[: study_date + 4] + b"D\x00\x00\x00" + data[study_date + 8 :]
    with pytest.raises(InvalidInstanceError) as refused:
        read_header(BytesIO(garbled), UID(ExplicitVRLittleEndian))
    assert str(refused.value).startswith("StudyDate (0008,0020): cannot be decoded")


# ---- what a header may cost (header.HeaderWalk) ----

SEQUENCE_UNDEFINED = struct.Struct("<HH2sHL")  # explicit VR: tag, "SQ", reserved, 32-bit length
ITEM = struct.Struct("<HHL")  # item and delimitation headers: tag, 32-bit length
UNDEFINED = 0xFFFFFFFF


def explicit(*, implicit_vr: bool = False) -> bytes:
    """The minimal CT dataset (it ends at InstanceNumber, (0020,0013)), little endian."""
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, implicit_vr
    write_dataset(stream, make_dataset())
    return stream.getvalue()


def sequence(group: int, element: int, items: bytes) -> bytes:
    """An explicit VR sequence of undefined length holding ``items``."""
    return SEQUENCE_UNDEFINED.pack(group, element, b"SQ", 0, UNDEFINED) + items + ITEM.pack(0xFFFE, 0xE0DD, 0)


def empty_items(count: int) -> bytes:
    """``count`` empty items of undefined length (16 bytes each, each a Dataset once pydicom reads it)."""
    return (ITEM.pack(0xFFFE, 0xE000, UNDEFINED) + ITEM.pack(0xFFFE, 0xE00D, 0)) * count


def refusal(data: bytes, syntax: str = ExplicitVRLittleEndian) -> str:
    with pytest.raises(InvalidInstanceError) as refused:
        read_header(BytesIO(data), UID(syntax))
    return str(refused.value)


def test_too_many_sequence_items_before_the_last_header_tag_are_refused_naming_the_sequence() -> None:
    """1.1 million empty items in a ContentSequence (17.6 MB), which extract never reads: refused once the walk
    passes MAX_HEADER_ENTRIES, naming the sequence and the limit."""
    data = explicit() + sequence(0x0040, 0xA730, empty_items(1_100_000))
    assert len(data) > 17_600_000

    assert refusal(data) == f"ContentSequence (0040,A730): over {MAX_HEADER_ENTRIES} header elements/items"


def test_a_sequence_with_many_items_within_the_limit_is_skipped_unread() -> None:
    """50000 items of an unwanted sequence: walked (headers only), not handed to pydicom; the header is read."""
    data = explicit() + sequence(0x0040, 0xA730, empty_items(50_000))
    header = read_header(BytesIO(data), UID(ExplicitVRLittleEndian))

    assert header.SOPInstanceUID == make_dataset().SOPInstanceUID
    assert "ContentSequence" not in header


def test_sequences_nested_too_deep_are_refused_naming_the_limit() -> None:
    """A wanted sequence whose items nest sequences MAX_HEADER_DEPTH + 5 deep."""
    nested = b""
    for _ in range(MAX_HEADER_DEPTH + 5):
        item = ITEM.pack(0xFFFE, 0xE000, UNDEFINED) + nested + ITEM.pack(0xFFFE, 0xE00D, 0)
        nested = sequence(0x0040, 0xA730, item)
    request_item = ITEM.pack(0xFFFE, 0xE000, UNDEFINED) + nested + ITEM.pack(0xFFFE, 0xE00D, 0)
    data = explicit() + sequence(0x0040, 0x0275, request_item)  # RequestAttributesSequence, which extract reads

    assert refusal(data) == f"ContentSequence (0040,A730): sequences nested over {MAX_HEADER_DEPTH} deep"


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit VR (as UT)", "implicit VR"])
def test_a_huge_header_value_is_refused_naming_the_element_and_the_limit(implicit_vr: bool) -> None:
    """A StudyDescription of 8 MiB (explicit VR: sent as UT, whose length has 32 bits): refused before it is
    read, naming the element and the limit."""
    size = 8 * 1024 * 1024
    implicit_header, explicit_header = struct.pack("<HHL", 0x0008, 0x1030, size), b"\x08\x00\x30\x10UT\x00\x00"
    element = implicit_header if implicit_vr else explicit_header + size.to_bytes(4, "little")
    # out of order after (0020,0013): the reader minds the order only at the last header tag
    data = explicit(implicit_vr=implicit_vr) + element + b"A" * size
    syntax = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian

    assert refusal(data, syntax) == f"StudyDescription (0008,1030): {size}-byte value, limit {MAX_HEADER_VALUE_BYTES}"


def test_a_large_value_nobody_reads_before_the_last_header_tag_is_skipped() -> None:
    """An encapsulated document of 20 MiB (0042,0011) and a private blob of undefined length (20 fragments of
    1 MiB) before (0070,0080): neither is read, the header is."""
    size = 20 * 1024 * 1024
    document = struct.pack("<HH2sHL", 0x0042, 0x0011, b"OB", 0, size) + bytes(size)
    fragments = (ITEM.pack(0xFFFE, 0xE000, 1024 * 1024) + bytes(1024 * 1024)) * 20
    blob = struct.pack("<HH2sHL", 0x0029, 0x1010, b"OB", 0, UNDEFINED) + fragments + ITEM.pack(0xFFFE, 0xE0DD, 0)

    header = read_header(BytesIO(explicit() + blob + document), UID(ExplicitVRLittleEndian))

    assert header.SOPInstanceUID == make_dataset().SOPInstanceUID


def test_a_wanted_sequence_sent_as_un_is_walked_in_implicit_vr_as_pydicom_decodes_it() -> None:
    """RequestAttributesSequence as UN of defined length (PS3.5 6.2.2: its items in implicit VR), its item
    nesting sequences MAX_HEADER_DEPTH + 5 deep: refused naming the nested sequence and the limit."""
    implicit_item = struct.Struct("<HHL")
    nested = b""
    for _ in range(MAX_HEADER_DEPTH + 5):  # implicit VR: tag, 32-bit length; items of defined length
        item = implicit_item.pack(0xFFFE, 0xE000, len(nested)) + nested
        nested = implicit_item.pack(0x0040, 0xA730, len(item)) + item
    value = implicit_item.pack(0xFFFE, 0xE000, len(nested)) + nested
    data = explicit() + struct.pack("<HH2sHL", 0x0040, 0x0275, b"UN", 0, len(value)) + value

    assert refusal(data) == f"ContentSequence (0040,A730): sequences nested over {MAX_HEADER_DEPTH} deep"
