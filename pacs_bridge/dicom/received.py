"""Where the data set of a received C-STORE is, and how long it is.

The listener sets pynetdicom's public ``STORE_RECV_CHUNKED_DATASET``, so that a C-STORE pynetdicom receives
itself is written to a temporary file (``Event.dataset_path``: 128-byte preamble, ``DICM``, the file meta
group, then the data set as received) rather than collected in memory. The fast path's inline store collects
its C-STOREs in a ``SpillingBuffer`` instead (``C_STORE.DataSet``). Either way ``received_data_set`` gives the
encoded data set from its first byte, and its length.

pynetdicom names those files in the process's temporary directory (``NamedTemporaryFile``), and leaves one behind
for good when its transfer is cut off. While a listener runs, the process's temporary directory is a directory
of its own (``claim_receive_directory``; removed when the last listener stops or the process exits, or else, once
empty, by the next process that claims one), and ``OrphanedReceiveFiles`` deletes every receive file in it that no
file descriptor of the process refers to: pynetdicom holds a receive file open from its creation until its
handler has run, so such a file is either an orphan or one pynetdicom is deleting itself; a live transfer's
never is. A message cut off may keep its file open until its association's objects are garbage-collected: the
sweep collects garbage a few times after such a cut.
"""

from __future__ import annotations

import atexit
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

_directory: str | None = None
_tempdir_before: str | None = None


_DIRECTORY_NAME = re.compile(r"pacs-bridge-(?P<pid>[0-9]+)-received-\w+")


def claim_receive_directory() -> str:
    """Make a directory of this process's own the process's temporary directory (``tempfile.tempdir``, where
    pynetdicom's ``NamedTemporaryFile`` puts the data sets it receives); its path. The listeners of a process
    share it: the first to start claims it, the last to stop releases it (or the process's exit). The empty
    receive directories of processes that ended without releasing theirs (killed) are deleted first."""
    global _directory, _tempdir_before
    if _directory is None:
        _tempdir_before = tempfile.tempdir
        parent = tempfile.gettempdir()
        _remove_dead_processes_directories(parent)
        _directory = tempfile.mkdtemp(prefix=f"pacs-bridge-{os.getpid()}-received-", dir=parent)
        tempfile.tempdir = _directory
        atexit.register(release_receive_directory)
    return _directory


def _remove_dead_processes_directories(parent: str) -> None:
    """Delete the empty receive directories in ``parent`` whose process is gone. One that still holds files is
    left alone: its process may be alive in another PID namespace sharing this directory (systemd's
    ``PrivateTmp`` clears them at the service's next start)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            match = _DIRECTORY_NAME.fullmatch(entry.name)
            if match is None or os.path.exists(f"/proc/{match['pid']}") or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):  # not empty, or not ours to remove
                os.rmdir(entry.path)


def receive_directory() -> str:
    """The directory ``claim_receive_directory`` made; RuntimeError when none is claimed."""
    if _directory is None:
        raise RuntimeError("no receive directory is claimed: start the listener first")
    return _directory


def release_receive_directory() -> None:
    """Give the process its temporary directory back; delete what is left of the receive directory, and it."""
    global _directory
    if _directory is None:
        return
    directory, _directory = _directory, None
    tempfile.tempdir = _tempdir_before
    atexit.unregister(release_receive_directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # files pynetdicom dropped unclosed
        gc.collect()
    remove_orphaned_receive_files(directory)
    with contextlib.suppress(OSError):  # not empty: a file someone still holds open, or not ours
        os.rmdir(directory)


class OrphanedReceiveFiles:
    """Deletes the receive files pynetdicom left in ``directory`` (see the module docstring). ``sweep`` may be
    called as often as wanted and looks once a second; after ``note_interrupted`` (a connection closed
    mid-message), it first collects garbage, which closes the files that dropped messages still hold open."""

    SWEEP_SECONDS = 1.0
    SETTLE_SECONDS = 2.0  # for the association's threads to end after its connection closed
    _COLLECTIONS = 5  # garbage collections after an interruption, while a dropped message may still be referenced

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._due: float | None = None
        self._collections = 0
        self._next_sweep = 0.0

    def note_interrupted(self, now: float) -> None:
        self._collections = self._COLLECTIONS
        if self._due is None:
            self._due = now + self.SETTLE_SECONDS

    def sweep(self, now: float) -> int:
        """Delete the receive files no descriptor refers to (collecting garbage first when due); the number."""
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + self.SWEEP_SECONDS
        if self._due is not None and now >= self._due:
            self._collections -= 1
            self._due = now + self.SETTLE_SECONDS if self._collections > 0 else None
            with warnings.catch_warnings():
                # pynetdicom dropped these file objects unclosed: collecting them closes them, with a warning each
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
        removed = remove_orphaned_receive_files(self.directory)
        if removed:
            log.info("orphaned_receive_files_removed", count=removed)
        return removed


def remove_orphaned_receive_files(directory: str) -> int:
    """Delete the receive files in ``directory`` that no file descriptor of this process refers to; the number.

    The directory is listed before the descriptors are: a file created in between is not listed, and a file
    listed and open then is live (or being deleted by pynetdicom, after its handler). When either cannot be
    listed (out of file descriptors), nothing is deleted."""
    try:
        names = [entry.name for entry in os.scandir(directory) if _CHUNKED_FILE_NAME.fullmatch(entry.name)]
        if not names:
            return 0
        open_now = _open_receive_files(directory)
    except OSError:  # gone, or out of descriptors: the next sweep
        return 0
    removed = 0
    for name in names:
        path = os.path.join(os.path.realpath(directory), name)
        if path in open_now:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


def open_receive_files(directory: str | None = None) -> set[str]:
    """The receive files this process has open in ``directory`` (by default the temporary directory; Linux),
    by their real paths; none when the descriptors cannot be listed."""
    try:
        return _open_receive_files(directory or tempfile.gettempdir())
    except OSError:
        return set()


def _open_receive_files(directory: str) -> set[str]:
    """``open_receive_files``, raising ``OSError`` when the descriptors cannot be listed."""
    directory = os.path.realpath(directory)
    paths: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing: not open
            continue
        head, name = os.path.split(target)
        if head == directory and _CHUNKED_FILE_NAME.fullmatch(name):
            paths.add(target)
    return paths
