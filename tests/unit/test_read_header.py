"""read_header refuses a dataset cut short inside a value, whatever is left of it."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs_bridge.dicom.header import read_header
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
