"""Where the data set of a received C-STORE is, and how long it is.

The listener sets pynetdicom's public ``STORE_RECV_CHUNKED_DATASET``, so that a C-STORE pynetdicom receives
itself is written to a temporary file (``Event.dataset_path``: 128-byte preamble, ``DICM``, the file meta
group, then the data set as received) rather than collected in memory. The fast path's inline store collects
its C-STOREs in a ``SpillingBuffer`` instead (``C_STORE.DataSet``). Either way ``received_data_set`` gives the
encoded data set from its first byte, and its length. ``OrphanedReceiveFiles`` deletes the files pynetdicom
leaves behind when a transfer is cut off.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog

log = structlog.get_logger("pacs_bridge.dicom")

_PREAMBLE_AND_PREFIX = 132  # 128-byte preamble + b"DICM"
_GROUP_LENGTH = struct.Struct("<HH2sHL")  # (0002,0000) UL, explicit VR little endian


class _DataSetInFile(io.RawIOBase):
    """A read-only view of ``file`` from ``offset`` on, positions counted from there."""

    def __init__(self, file: BinaryIO, offset: int) -> None:
        super().__init__()
        self._file = file
        self._offset = offset
        file.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._file.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        data = self._file.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self._offset
        return self._file.seek(offset, whence) - self._offset

    def tell(self) -> int:
        return self._file.tell() - self._offset

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True, slots=True)
class ReceivedDataSet:
    stream: BinaryIO  # positioned anywhere; read_header seeks to 0
    size: int  # bytes of encoded data set
    owned: bool  # close() closes the stream (a file we opened), else its owner does

    def close(self) -> None:
        if self.owned:
            self.stream.close()


def data_set_offset(file: BinaryIO) -> int:
    """Where the data set starts in a file of pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` (after its meta)."""
    file.seek(0)
    head = file.read(_PREAMBLE_AND_PREFIX + _GROUP_LENGTH.size)
    if len(head) < _PREAMBLE_AND_PREFIX + _GROUP_LENGTH.size or head[128:132] != b"DICM":
        raise ValueError("not a DICOM file with a preamble and a file meta group length")
    group, element, vr, _length, group_length = _GROUP_LENGTH.unpack_from(head, _PREAMBLE_AND_PREFIX)
    if (group, element, vr) != (0x0002, 0x0000, b"UL"):
        raise ValueError("the file meta group does not start with its group length")
    return _PREAMBLE_AND_PREFIX + _GROUP_LENGTH.size + int(group_length)


def received_data_set(event: Any) -> ReceivedDataSet:
    """The data set of the C-STORE ``event`` (pynetdicom's EVT_C_STORE)."""
    path: Path | None = event.dataset_path
    if path is not None:
        file = open(path, "rb")  # noqa: SIM115 - closed by ReceivedDataSet.close
        try:
            offset = data_set_offset(file)
            size = os.fstat(file.fileno()).st_size - offset
            stream: BinaryIO = io.BufferedReader(_DataSetInFile(file, offset))
        except BaseException:
            file.close()
            raise
        return ReceivedDataSet(stream=stream, size=size, owned=True)
    buffer = event.request.DataSet
    size_of = getattr(buffer, "size", None)
    size = int(size_of()) if callable(size_of) else len(buffer.getbuffer())
    return ReceivedDataSet(stream=buffer, size=size, owned=False)


_CHUNKED_FILE_NAME = re.compile(r"tmp[A-Za-z0-9_]+\.dcm")  # pynetdicom: NamedTemporaryFile(suffix=".dcm")


class OrphanedReceiveFiles:
    """Deletes the temporary files pynetdicom leaves when a C-STORE it receives is cut off mid-data-set.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each data set to a named temporary file and deletes it
    after the handler. When the association ends before the data set's last fragment, the message is dropped
    with its file still open (closed only when garbage-collected), and the file stays on disk for good. The
    listener notes each connection that closes mid-data-set (``note_interrupted``); a little later
    ``sweep_if_due`` collects garbage and deletes the files that this closed: pynetdicom's own deletes them after
    the handler, so a file of that kind still there once its last reference is gone was dropped.
    """

    SETTLE_SECONDS = 2.0  # for the association's threads to end after its connection closed
    _ATTEMPTS = 5  # sweeps after an interruption, while a dropped message may still be referenced

    def __init__(self) -> None:
        self._due: float | None = None
        self._attempts = 0
        self._directory = tempfile.gettempdir()  # now: finding it opens a file, which may fail later (EMFILE)

    def note_interrupted(self, now: float) -> None:
        self._attempts = self._ATTEMPTS
        if self._due is None:
            self._due = now + self.SETTLE_SECONDS

    def sweep_if_due(self, now: float) -> int:
        """Once due, collect garbage and delete the receive files that closed; the number deleted."""
        if self._due is None or now < self._due:
            return 0
        self._attempts -= 1
        self._due = now + self.SETTLE_SECONDS if self._attempts > 0 else None
        open_before = open_receive_files(self._directory)
        if not open_before:
            return 0
        with warnings.catch_warnings():
            # pynetdicom dropped these file objects unclosed: collecting them closes them, with a warning each
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        removed = 0
        for path in open_before - open_receive_files(self._directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        if removed:
            log.info("orphaned_receive_files_removed", count=removed)
        return removed


def open_receive_files(directory: str | None = None) -> set[str]:
    """The temporary files this process has open where pynetdicom writes the C-STOREs it receives (Linux):
    ``directory``, by default the temporary directory."""
    directory = directory or tempfile.gettempdir()
    paths: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            head, name = os.path.split(target)
            if head == directory and _CHUNKED_FILE_NAME.fullmatch(name):
                paths.add(target)
    return paths
