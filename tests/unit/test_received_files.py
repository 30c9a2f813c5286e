"""The sweep of pynetdicom's received data set files (dicom/received.py): a file this process holds open is
live and stays, a file nobody holds is an orphan and goes, whatever the order they came in."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO

from pacs_bridge.dicom.received import (
    OrphanedReceiveFiles,
    claim_receive_directory,
    release_receive_directory,
    remove_orphaned_receive_files,
)


def receive_file(directory: Path) -> IO[bytes]:
    """A file as pynetdicom opens one for a data set it receives."""
    return tempfile.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm", dir=directory)


def test_files_no_descriptor_refers_to_are_deleted_and_open_ones_stay(tmp_path: Path) -> None:
    """Three dropped (closed) files and two live (open) ones, interleaved: the three go, the two stay; files of
    other names are never touched."""
    live, dropped = [], []
    for n in range(5):
        file = receive_file(tmp_path)
        file.write(b"\0" * 132)
        if n % 2:
            live.append(file)
        else:
            file.close()
            dropped.append(Path(file.name))
    other = tmp_path / "notes.dcm"
    other.write_bytes(b"kept")

    assert remove_orphaned_receive_files(str(tmp_path)) == 3

    assert not any(path.exists() for path in dropped)
    assert all(Path(file.name).exists() for file in live)
    assert other.exists()
    for file in live:
        file.close()


def test_the_sweep_looks_at_most_once_a_second(tmp_path: Path) -> None:
    """Called on every turn of the front door's loop, the sweep lists the directory once a second."""
    sweep = OrphanedReceiveFiles(str(tmp_path))
    receive_file(tmp_path).close()
    assert sweep.sweep(100.0) == 1
    receive_file(tmp_path).close()
    assert sweep.sweep(100.5) == 0
    assert sweep.sweep(101.0) == 1


def test_the_receive_directory_is_the_temporary_directory_while_claimed_and_gone_after(tmp_path: Path) -> None:
    """Claimed: new temporary files go to a directory of this process's own, and an empty one a killed process
    left is removed; released: the temporary directory is what it was, the receive directory gone with the file
    pynetdicom left in it."""
    stale = tmp_path / "pacs-bridge-999999999-received-abc"  # no such process
    stale.mkdir()
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        directory = claim_receive_directory()
        assert tempfile.gettempdir() == directory
        assert Path(directory).parent == tmp_path
        assert not stale.exists()
        receive_file(Path(directory)).close()  # a file pynetdicom dropped
        release_receive_directory()
        assert tempfile.tempdir == str(tmp_path)
        assert not Path(directory).exists()
    finally:
        tempfile.tempdir = before
