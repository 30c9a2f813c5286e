"""Unit tests for ``pacs_bridge.dicom.inflate`` and ``read_header`` on deflated datasets: inflated as a stream,
checked whole, bounded in size, never held whole in memory."""

from __future__ import annotations

import io
import random
import tracemalloc
from collections.abc import Iterator

import pytest
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from pacs_bridge.dicom.extract import extract_instance
from pacs_bridge.dicom.header import read_header
from pacs_bridge.dicom.inflate import INFLATED_CHUNK, InflatedStream
from pacs_bridge.errors import InvalidInstanceError
from tests.support.raw_files import MiB, deflated, encoded, pixel_data_header, zeros
from tests.support.studies import make_dataset


def deflated_zeros(size: int, *, prefix: bytes = b"") -> bytes:
    """``prefix`` then ``size`` zero bytes, deflated a MiB at a time (never ``size`` bytes in memory)."""
    return deflated([prefix, *zeros(size)])


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


SAMPLE = bytes(random.Random(14).getrandbits(8) for _ in range(300_000)) + b"DICOM" * 200_000


def test_reads_seeks_and_skips_give_the_inflated_bytes() -> None:
    """Reading from the start, seeking back to 0, skipping forward and reading across the end give exactly the
    bytes zlib inflates in one go; drain counts the whole size."""
    with InflatedStream(io.BytesIO(deflated([SAMPLE])), max_bytes=len(SAMPLE)) as stream:
        assert stream.read(1000) == SAMPLE[:1000]
        assert stream.seek(0) == 0 and stream.read(70_000) == SAMPLE[:70_000]
        assert stream.seek(400_000) == 400_000 and stream.read(10) == SAMPLE[400_000:400_010]
        assert stream.seek(-5, io.SEEK_CUR) == 400_005 and stream.read(5) == SAMPLE[400_005:400_010]
        assert stream.tell() == 400_010
        assert stream.drain() == len(SAMPLE)


def test_reading_to_the_end_stops_at_the_end() -> None:
    with InflatedStream(io.BytesIO(deflated([b"short"])), max_bytes=100) as stream:
        assert (stream.read(), stream.read(10), stream.drain()) == (b"short", b"", 5)


def test_padding_after_the_last_deflate_block_is_ignored() -> None:
    """PS3.5 A.5 lets the bitstream be padded to an even length; bytes after its end are not data."""
    with InflatedStream(io.BytesIO(deflated([SAMPLE]) + b"\x00"), max_bytes=len(SAMPLE)) as stream:
        assert stream.drain() == len(SAMPLE)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"this is not a deflate bitstream at all" * 10, "the deflated data is corrupt"),  # garbage
        (deflated([SAMPLE])[:-200], "ends before the end of its last deflate block"),  # cut short
        (b"", "ends before the end of its last deflate block"),  # nothing at all
    ],
    ids=["garbage", "cut short", "empty"],
)
def test_corrupt_or_cut_short_data_is_refused(data: bytes, detail: str) -> None:
    """InvalidInstanceError (0xC000) saying what is wrong, not a zlib error (0x0110 and a traceback)."""
    with (
        InflatedStream(io.BytesIO(data), max_bytes=10 * MiB) as stream,
        pytest.raises(InvalidInstanceError, match=detail),
    ):
        stream.drain()


def test_a_bomb_is_refused_past_the_limit_in_bounded_memory(traced: None) -> None:
    """64 MiB of zeros in about 64 kB of deflate: refused once 16 MiB are inflated, while memory stays well under
    one MiB of the header bytes kept plus zlib's chunks."""
    bomb = deflated_zeros(64 * MiB)
    assert len(bomb) < 100_000
    tracemalloc.reset_peak()

    with InflatedStream(io.BytesIO(bomb), max_bytes=16 * MiB) as stream:
        assert len(stream.read(1000)) == 1000
        with pytest.raises(InvalidInstanceError, match=r"inflates to over 16777216 bytes \(dicom.max_inflated_bytes"):
            stream.drain()

    _, peak = tracemalloc.get_traced_memory()
    assert peak < 4 * INFLATED_CHUNK


def test_read_header_of_a_deflated_dataset_reads_the_header_and_checks_the_rest(traced: None) -> None:
    """The record equals that of the same dataset sent uncompressed; its 64 MiB of pixel data are inflated to
    be checked and counted, never kept."""
    header = encoded(make_dataset())
    data = deflated_zeros(64 * MiB, prefix=header + pixel_data_header(64 * MiB))
    tracemalloc.reset_peak()

    dataset = read_header(io.BytesIO(data), UID(DeflatedExplicitVRLittleEndian), max_inflated_bytes=65 * MiB)

    _, peak = tracemalloc.get_traced_memory()
    assert peak < 4 * INFLATED_CHUNK + len(data)
    plain = read_header(io.BytesIO(header), UID(ExplicitVRLittleEndian))
    assert extract_instance(dataset) == extract_instance(plain)


def test_read_header_refuses_a_deflated_dataset_whose_tail_is_corrupt() -> None:
    """A good header then garbage: refused, although the header alone could be read."""
    good = deflated([encoded(make_dataset()), pixel_data_header(100_000), bytes(100_000)])
    corrupt = good[:40] + bytes(b ^ 0x55 for b in good[40:])
    with pytest.raises(InvalidInstanceError, match="deflated data"):
        read_header(io.BytesIO(corrupt), UID(DeflatedExplicitVRLittleEndian))


def test_read_header_refuses_a_deflated_dataset_inflating_past_the_limit() -> None:
    data = deflated_zeros(8 * MiB, prefix=encoded(make_dataset()) + pixel_data_header(8 * MiB))
    with pytest.raises(InvalidInstanceError, match=r"dicom\.max_inflated_bytes"):
        read_header(io.BytesIO(data), UID(DeflatedExplicitVRLittleEndian), max_inflated_bytes=4 * MiB)
