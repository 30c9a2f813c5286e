"""The header scan (dicom/header.py) gives the raw elements pydicom's own reader gives, or leaves the dataset to
pydicom: never a different header."""

from __future__ import annotations

import warnings
from io import BytesIO

import pytest
from hypothesis import given
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_bridge.dicom import header
from pacs_bridge.dicom.extract import HEADER_TAGS, extract_instance
from pacs_bridge.dicom.header import LAST_HEADER_TAG, read_header, scan_header
from pacs_bridge.errors import InvalidInstanceError
from tests.support.studies import make_dataset
from tests.unit.test_extract_fuzz import FUZZ, mutated


def encoded(ds: Dataset, syntax: str) -> bytes:
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = UID(syntax).is_little_endian, UID(syntax).is_implicit_VR
    write_dataset(stream, ds)
    return stream.getvalue()


def read_by_pydicom(data: bytes, syntax: str) -> Dataset:
    return read_dataset(
        BytesIO(data),
        UID(syntax).is_implicit_VR,
        UID(syntax).is_little_endian,
        stop_when=lambda tag, _vr, _length: tag > LAST_HEADER_TAG,
        specific_tags=list(HEADER_TAGS),
    )


def same_header(scanned: Dataset, by_pydicom: Dataset) -> bool:
    """Same raw elements (tag, VR, length, value, offset, encoding flags) and the same original encoding."""
    elements = [(tag, scanned.get_item(tag)) for tag in scanned.keys()]  # noqa: SIM118 - keep them raw
    expected = [(tag, by_pydicom.get_item(tag)) for tag in by_pydicom.keys()]  # noqa: SIM118
    return sorted(elements) == sorted(expected) and scanned.original_encoding == by_pydicom.original_encoding


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_ordinary_dataset_is_scanned_to_the_header_pydicom_reads(syntax: str) -> None:
    """With a defined-length code sequence and a character set, in both little-endian encodings."""
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100", StudyDescription="Tête")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHEST", "99LOCAL", "CT chest"
    ds.ProcedureCodeSequence = Sequence([code])
    data = encoded(ds, syntax)
    scanned = scan_header(data, implicit_vr=UID(syntax).is_implicit_VR, complete=True)
    assert scanned is not None
    assert same_header(scanned, read_by_pydicom(data, syntax))
    assert extract_instance(scanned).study.procedure_codes[0].code == "CTCHEST"
    assert extract_instance(scanned).study.study_description == "Tête"


def test_an_undefined_length_sequence_is_left_to_pydicom() -> None:
    ds = make_dataset()
    ds.ProcedureCodeSequence = Sequence([Dataset()])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    data = encoded(ds, ExplicitVRLittleEndian)
    assert scan_header(data, implicit_vr=False, complete=True) is None
    assert extract_instance(read_header(BytesIO(data), UID(ExplicitVRLittleEndian))).sop_instance_uid


def test_an_encoding_that_contradicts_the_transfer_syntax_is_left_to_pydicom() -> None:
    data = encoded(make_dataset(), ExplicitVRLittleEndian)
    assert scan_header(data, implicit_vr=True, complete=True) is None
    assert scan_header(encoded(make_dataset(), ImplicitVRLittleEndian), implicit_vr=False, complete=True) is None


def test_a_header_longer_than_the_scanned_bytes_is_left_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(make_dataset(), ExplicitVRLittleEndian)
    assert scan_header(data[:100], implicit_vr=False, complete=False) is None
    monkeypatch.setattr(header, "SCANNED_BYTES", 100)
    scanned_by_pydicom = read_header(BytesIO(data), UID(ExplicitVRLittleEndian))
    assert same_header(scanned_by_pydicom, read_by_pydicom(data, ExplicitVRLittleEndian))


def test_big_endian_is_read_by_pydicom() -> None:
    data = encoded(make_dataset(), ExplicitVRBigEndian)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pydicom deprecates writing big endian, not reading
        record = extract_instance(read_header(BytesIO(data), UID(ExplicitVRBigEndian)))
    assert record == extract_instance(make_dataset())


@FUZZ
@given(mutated())
def test_a_mutated_dataset_is_scanned_as_pydicom_reads_it_or_left_to_pydicom(case: tuple[str, bytes]) -> None:
    """Random overwrites, insertions, deletions and cuts: where the scan gives a header, pydicom's reader gives
    the same one (and does not fail)."""
    syntax, data = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn alike about a character set they do not know
        try:
            scanned = scan_header(data, implicit_vr=UID(syntax).is_implicit_VR, complete=True)
        except Exception as scan_failure:  # an undecodable character set: pydicom's reader fails on it too
            with pytest.raises(type(scan_failure)):
                read_by_pydicom(data, syntax)
            return
        if scanned is None:
            return
        by_pydicom = read_by_pydicom(data, syntax)
    assert same_header(scanned, by_pydicom)


def test_a_dataset_ending_inside_a_header_value_is_left_to_pydicom_which_names_the_element() -> None:
    """A scanned header holds whole values only, so ``read_header`` trusts it as it is; a value cut short is
    pydicom's to read, and the refusal names it."""
    data = encoded(make_dataset(), ExplicitVRLittleEndian)
    cut = data[: data.index(make_dataset().SeriesInstanceUID.encode()) + 10]
    assert scan_header(cut, implicit_vr=False, complete=True) is None
    with pytest.raises(InvalidInstanceError, match=r"^SeriesInstanceUID \(0020,000E\): truncated"):
        read_header(BytesIO(cut), UID(ExplicitVRLittleEndian))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_each_dataset_keeps_its_own_character_set_when_several_alternate(syntax: str) -> None:
    """The encodings of a Specific Character Set are worked out once per value and reused: datasets stating
    different ones, in turn, each get theirs, as pydicom's reader gives them."""
    for character_set in ("ISO_IR 100", "ISO_IR 192", "ISO_IR 100", "", "ISO 2022 IR 6\\ISO 2022 IR 87"):
        ds = make_dataset()
        ds.SpecificCharacterSet = character_set
        data = encoded(ds, syntax)
        scanned = scan_header(data, implicit_vr=UID(syntax).is_implicit_VR, complete=True)
        assert scanned is not None and same_header(scanned, read_by_pydicom(data, syntax)), character_set
