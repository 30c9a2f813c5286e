"""dicom.message_screen on a real listener, on both receive paths: on, every association's messages pass the
screen; off, pynetdicom dispatches them itself (the plain path) and C-STOREs are stored as ever."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pacs_bridge.dicom.message_screen import MessageScreen, MessageScreenUnavailable
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.integration.conftest import listener_settings
from tests.support.associations import wait_for_associations_to_end
from tests.support.studies import make_dataset


@pytest.fixture(params=[True, False], ids=["screen_on", "screen_off"])
def started(index: Index, receive_path: str, request: pytest.FixtureRequest) -> Iterator[DicomListener]:
    settings = listener_settings(receive_path, message_screen=request.param)
    running = DicomListener(settings, index, clock=lambda: datetime.now(UTC))
    running.start()
    assert (running.message_screen == MessageScreen()) is request.param
    yield running
    running.stop(drain_timeout_seconds=5)


def test_the_switch_decides_who_dispatches_and_c_stores_are_stored_either_way(
    started: DicomListener, index: Index
) -> None:
    """With the screen on, the acceptor's ``_serve_request`` is the screen's; off, it is pynetdicom's own method,
    and a C-STORE is answered Success and indexed all the same."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", started.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    try:
        (acceptor,) = started.associations
        screened = "_serve_request" in vars(acceptor)  # the screen shadows pynetdicom's method on the instance
        ds = make_dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
        wait_for_associations_to_end(started)
    on = started.message_screen == MessageScreen()
    assert on or started.message_screen == MessageScreenUnavailable("dicom.message_screen is off")
    assert screened is on
    assert status.Status == 0x0000
    assert index.load_snapshot(ds.StudyInstanceUID).series[0].instances[0].sop_instance_uid == ds.SOPInstanceUID
