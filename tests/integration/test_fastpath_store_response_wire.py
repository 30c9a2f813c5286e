"""C-STORE responses encoded by dicom/fastpath/inline_store.py, on real associations: pynetdicom and DCMTK
read them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from pacs_bridge.dicom.fastpath import inline_store
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import storescu
from tests.support.studies import SeriesSpec, new_study_uid, write_study


@pytest.fixture
def listener(fast_path_listener: DicomListener) -> DicomListener:
    """The pieces under test are the fast path's: this module's listener has it on."""
    return fast_path_listener


def test_plain_responses_take_the_one_step_encoding_and_both_senders_read_them(
    listener: DicomListener, index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[str] = []
    original = inline_store.encode_store_response

    def counting(**fields: object) -> bytes:
        encoded.append(str(fields["sop_instance_uid"]))
        return original(**fields)  # type: ignore[arg-type]

    monkeypatch.setattr(inline_store, "encode_store_response", counting)
    first_uid, second_uid = new_study_uid(), new_study_uid()
    paths = write_study(tmp_path / "first", first_uid, [SeriesSpec("CT", 3)])
    datasets = [dcmread(path) for path in paths]
    ae = AE()
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    for dataset in datasets:
        assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    write_study(tmp_path / "second", second_uid, [SeriesSpec("MR", 4)])
    result = storescu(listener.port, tmp_path / "second")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("Received Store Response (Success)") == 4
    wait_for_associations_to_end(listener)
    assert encoded[:3] == [dataset.SOPInstanceUID for dataset in datasets]
    assert len(encoded) == 3 + 4
    assert index.load_snapshot(second_uid).number_of_instances == 4
