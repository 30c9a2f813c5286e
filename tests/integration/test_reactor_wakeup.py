"""pynetdicom's association reactor is woken by each DIMSE message (dicom/reactor.py), on real associations."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, association

from pacs_bridge.dicom import reactor
from pacs_bridge.dicom.scp import DicomListener, ListenerSettings
from pacs_bridge.index.repository import Index
from tests.support.studies import SeriesSpec, new_study_uid, write_study

STORES = 5


def test_the_reactor_sleep_is_the_one_the_adaptation_replaces() -> None:
    """pynetdicom 3.0's reactor sleeps exactly ``REACTOR_SLEEP`` on ``association.time``: if a release changes
    the literal or the import, the adaptation stops applying and this fails."""
    source = Path(association.__file__).read_text(encoding="utf-8")
    reactor_body = source.split("def _run_reactor(self)", 1)[1].split("\n    def ", 1)[0]
    assert f"time.sleep({reactor.REACTOR_SLEEP})" in reactor_body
    assert "\nimport time\n" in source


def test_each_c_store_wakes_the_reactor_of_its_association(index: Index, tmp_path: Path) -> None:
    """Five C-STOREs on one association: the acceptor's message queue is the waking one, and its reactor was
    woken at least once per request rather than only finding them after its sleeps."""
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=lambda: datetime.now(UTC)
    )
    running.start()
    clock = reactor.install()
    module: Any = association
    assert module.time is clock
    study_uid = new_study_uid()
    paths = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", STORES)])
    datasets = [dcmread(path) for path in paths]
    try:
        ae = AE()
        ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established
        (acceptor,) = running._server.active_associations
        assert isinstance(acceptor.dimse.msg_queue, reactor._WakingQueue)
        assert not isinstance(assoc.dimse.msg_queue, reactor._WakingQueue)  # our own SCU is left alone
        woken_before = clock.woken
        for dataset in datasets:
            assert assoc.send_c_store(dataset).Status == 0x0000
        woken = clock.woken - woken_before
        assoc.release()
        deadline = time.monotonic() + 10
        while running._server.active_associations and time.monotonic() < deadline:
            threading.Event().wait(0.02)
    finally:
        running.stop(drain_timeout_seconds=5)
    assert woken >= STORES
    assert index.load_snapshot(study_uid).number_of_instances == STORES
