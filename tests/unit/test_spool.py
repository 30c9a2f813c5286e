"""SpillingBuffer: memory while small, an anonymous temporary file once large, a BytesIO to pynetdicom."""

from __future__ import annotations

import io

from pacs_bridge.dicom.spool import SpillingBuffer


def test_small_writes_stay_in_memory():
    """Below the threshold nothing touches the disk and the buffer behaves like BytesIO."""
    buffer = SpillingBuffer(threshold=16)
    buffer.write(b"0123456789")
    assert not buffer.spilled
    buffer.seek(2)
    assert (buffer.read(3), buffer.tell(), buffer.size(), buffer.getvalue()) == (b"234", 5, 10, b"0123456789")


def test_crossing_the_threshold_moves_everything_to_a_file_and_frees_the_memory():
    """The write that crosses the threshold spills what was written before; reads see one continuous stream."""
    buffer = SpillingBuffer(threshold=8)
    buffer.write(b"abcdef")
    buffer.write(b"ghijkl")
    assert buffer.spilled
    assert io.BytesIO.getbuffer(buffer).nbytes == 0  # the in-memory part was truncated
    assert buffer.size() == 12
    buffer.seek(0)
    assert buffer.read() == b"abcdefghijkl"
    buffer.seek(4)
    assert buffer.read(4) == b"efgh"
    assert buffer.getvalue() == b"abcdefghijkl"
    buffer.close()
    assert not buffer.spilled
