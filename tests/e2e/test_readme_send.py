"""The README's command for sending a folder, run as written against a running bridge: compressed files go in
their own transfer syntax, and a refused or unreadable file does not stop the rest."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.support.bridge_process import BridgeProcess, log_events

pytestmark = pytest.mark.dcmtk

README = Path(__file__).resolve().parents[2] / "README.md"

# pydicom's bundled examples, one per transfer syntax family.
STORED = (
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_RLE.dcm",  # RLE Lossless
    "JPEG2000.dcm",  # JPEG 2000
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless, first-order prediction
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
)
REFUSED = "JPEGLSNearLossless_08.dcm"  # JPEG-LS near-lossless, and no StudyInstanceUID: 0xC000


def readme_send_command() -> str:
    """The line after the README's '# every file under the folder' comment."""
    lines = README.read_text(encoding="utf-8").splitlines()
    position = next(i for i, line in enumerate(lines) if line.startswith("# every file under the folder"))
    return lines[position + 1]


def test_the_readme_command_sends_a_mixed_folder_past_a_refused_file(tmp_path: Path):
    """Six instances in five transfer syntaxes are stored, the dataset without StudyInstanceUID is refused with
    0xC000, and a file that is not DICOM is skipped; dcmsend exits 0."""
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    for name in (REFUSED, *STORED[:3]):  # the refused file first: what comes after it must still arrive
        shutil.copy(str(get_testdata_file(name)), folder / name)
    for name in STORED[3:]:
        shutil.copy(str(get_testdata_file(name)), folder / "nested" / name)
    (folder / "README.txt").write_text("not DICOM\n", encoding="utf-8")
    bridge = BridgeProcess(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'index.db'}", fhir_base_url="http://127.0.0.1:9/fhir"
    )
    command = readme_send_command()
    assert command.startswith("TCP_NODELAY=1 /usr/bin/dcmsend ") and " 11112 path/to/folder/" in command
    command = command.replace(" 11112 ", f" {bridge.port} ").replace("path/to/folder/", f"{folder}/")
    try:
        bridge.start()
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, check=False)
        stored = bridge.instance_count()  # Success is answered after the commit: nothing to wait for
        log = bridge.log()
    finally:
        bridge.close()

    assert result.returncode == 0, result.stdout + result.stderr
    assert stored == len(STORED)
    rejected = log_events(log, "instance_rejected")
    assert [(event["status"], event["error"]) for event in rejected] == [
        ("0xC000", "StudyInstanceUID (0020,000D): is missing or empty; it is required")
    ]
    assert re.search(r"README\.txt", result.stdout + result.stderr), "dcmsend names the file it skipped"
