"""DICOM files written byte for byte, and sent as they are: what no well-behaved encoder would produce.

pynetdicom, with ``STORE_SEND_CHUNKED_DATASET``, sends a file's dataset bytes untouched and takes the C-STORE
command's Affected SOP Class and Instance UIDs from its file meta. So a file written here can carry a deflate
bomb, a corrupt deflate bitstream, or a command whose UIDs differ from the dataset's.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom import AE, _config, build_context

MiB = 1024 * 1024


def encoded(ds: Dataset, *, implicit_vr: bool = False) -> bytes:
    """``ds`` as little-endian dataset bytes (explicit VR unless asked otherwise), no file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit_vr
    write_dataset(fp, ds)
    return fp.getvalue()


def pixel_data_header(length: int) -> bytes:
    """The header of a (7FE0,0010) OB element of ``length`` bytes, Explicit VR Little Endian."""
    return b"\xe0\x7f\x10\x00OB\x00\x00" + length.to_bytes(4, "little")


def deflated(parts: Iterable[bytes]) -> bytes:
    """``parts``, joined, as a raw deflate bitstream (PS3.5 A.5), compressed as they come."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join([*(compressor.compress(part) for part in parts), compressor.flush()])


def zeros(size: int) -> Iterator[bytes]:
    """``size`` zero bytes, a MiB at a time."""
    chunk = bytes(MiB)
    for start in range(0, size, MiB):
        yield chunk[: min(MiB, size - start)]


def write_raw_file(path: Path, *, sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes) -> Path:
    """A Part 10 file: preamble, file meta naming these UIDs and transfer syntax, then ``dataset`` as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + fp.getvalue() + dataset)
    return path


@contextlib.contextmanager
def files_sent_as_they_are() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes as they are on disk instead of decoding and re-encoding them."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def store_file(port: int, path: Path, *, abstract_syntax: str, transfer_syntax: str) -> Any:
    """Send the file at ``path`` as it is, on one association proposing this one context; the response status
    dataset (empty when none came)."""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [build_context(abstract_syntax, [transfer_syntax])]
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established, "the listener refused the association"
    try:
        with files_sent_as_they_are():
            return assoc.send_c_store(path)
    finally:
        assoc.release()
