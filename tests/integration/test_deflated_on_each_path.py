"""Deflated datasets through the listener, served inline and by pynetdicom's own Storage SCP alike: a good one
stored, a bomb and corrupt data refused with 0xC000 (sent by pynetdicom as written; SQLite and PostgreSQL)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.support.raw_files import MiB, deflated, encoded, pixel_data_header, store_file, write_raw_file, zeros
from tests.support.studies import make_dataset, uid

CT = "1.2.840.10008.5.1.4.1.1.2"
HEADER = encoded(make_dataset())

CASES: list[tuple[Callable[[], bytes], int, str | None]] = [
    # (the dataset's bytes, built when the test runs; status; ErrorComment start)
    (lambda: deflated([HEADER, pixel_data_header(4 * MiB), *zeros(4 * MiB)]), 0x0000, None),  # a deflated image
    (  # 300 MiB in 300 kB, over the default dicom.max_inflated_bytes
        lambda: deflated([HEADER, pixel_data_header(300 * MiB), *zeros(300 * MiB)]),
        0xC000,
        "inflates to over 268435456",
    ),
    (lambda: deflated([HEADER])[:20] + random.Random(3).randbytes(2000), 0xC000, "the deflated data is corrupt"),
]


@pytest.mark.parametrize(("build", "status", "comment"), CASES, ids=["good", "bomb", "corrupt"])
def test_deflated_data_gets_the_same_answer_on_either_path(
    listener_on_each_path: DicomListener,
    index: Index,
    tmp_path: Path,
    build: Callable[[], bytes],
    status: int,
    comment: str | None,
) -> None:
    """Success and indexed, or 0xC000 saying why and nothing indexed, whichever path serves the C-STORE."""
    data = build()
    path = write_raw_file(
        tmp_path / "deflated.dcm",
        sop_class=CT,
        sop_instance=uid("3.1.1"),
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        dataset=data,
    )

    answer = store_file(
        listener_on_each_path.port, path, abstract_syntax=CT, transfer_syntax=DeflatedExplicitVRLittleEndian
    )

    assert answer.Status == status
    if comment is None:
        assert index.load_snapshot(uid("1")).number_of_instances == 1
    else:
        assert answer.ErrorComment.startswith(comment)
        assert index.study_status(uid("1")) is None
