"""C-STOREs served on the DUL thread that read them (dicom/fastpath/inline_store.py), on real associations."""

from __future__ import annotations

import copy
import inspect
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, dul, evt, fsm

from pacs_bridge.dicom.fastpath import inline_store
from pacs_bridge.dicom.listener_settings import ListenerSettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import storescu
from tests.support.studies import SeriesSpec, new_study_uid, write_study


@pytest.fixture
def listener(fast_path_listener: DicomListener) -> DicomListener:
    """The pieces under test are the fast path's: this module's listener has it on."""
    return fast_path_listener


def test_the_dt_2_action_is_the_one_the_patch_replaces() -> None:
    """pynetdicom 3.0 runs DT-2 for a P-DATA-TF received in Sta6 and hands the PDU to its DIMSE provider: if a
    release changes either, this fails."""
    assert fsm.TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2"
    source = inspect.getsource(fsm.DT_2)
    assert "pdu = dul._recv_pdu.get(False)" in source
    assert 'dul.assoc.dimse.receive_primitive(cast("P_DATA", pdu.to_primitive()))' in source
    inline_store.patch()
    assert fsm.ACTIONS["DT-2"][1].__module__ == inline_store.__name__


def test_the_dul_reads_every_pdu_through_the_method_the_patch_shadows() -> None:
    """pynetdicom 3.0's DUL thread reads a PDU by calling ``self._read_pdu_data()`` when its socket is readable,
    and that read queues the PDU for the state machine: the prepared association's own read stands in there."""
    source = inspect.getsource(dul.DULServiceProvider._is_transport_event)
    assert source.count("self._read_pdu_data()") == 2
    read = inspect.getsource(dul.DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read
    assert "self.event_queue.put(event)" in read and "self._recv_pdu.put(pdu)" in read


def study(tmp_path: Path, instances: int) -> tuple[str, list[Dataset]]:
    study_uid = new_study_uid()
    paths = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", instances)])
    return study_uid, [dcmread(path) for path in paths]


def associate(port: int, dataset: Dataset) -> Any:
    ae = AE()
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    return assoc


def test_stores_are_served_inline_and_an_echo_and_a_refusal_still_take_pynetdicoms_way(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    study_uid, datasets = study(tmp_path, 3)
    without_study = copy.deepcopy(datasets[0])
    del without_study.StudyInstanceUID
    assoc = associate(listener.port, datasets[0])
    (acceptor,) = listener.associations
    served = inline_store.inline_store_of(acceptor)
    assert served is not None
    assert assoc.send_c_store(datasets[0]).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    refused = assoc.send_c_store(without_study)
    assert [assoc.send_c_store(dataset).Status for dataset in datasets[1:]] == [0x0000, 0x0000]
    assoc.release()
    wait_for_associations_to_end(listener)
    assert refused.Status == 0xC000 and "StudyInstanceUID" in refused.ErrorComment
    assert served.served == 4
    assert served.pdus_read >= 5  # every P-DATA-TF was read whole, the echo's too (then handed to pynetdicom)
    assert index.load_snapshot(study_uid).number_of_instances == 3


@pytest.fixture
def small_pdu_listener(index: Index) -> Iterator[DicomListener]:
    """A listener that takes PDUs of at most 128 bytes: every request arrives in many fragments."""
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0, max_pdu_bytes=128),
        index,
        clock=lambda: datetime.now(UTC),
    )
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


def test_a_request_cut_into_many_fragments_is_put_back_together(
    small_pdu_listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """Command sets and datasets of 128-byte PDUs: every instance is stored whole."""
    study_uid, datasets = study(tmp_path, 3)
    assoc = associate(small_pdu_listener.port, datasets[0])
    (acceptor,) = small_pdu_listener.associations
    assert [assoc.send_c_store(dataset).Status for dataset in datasets] == [0x0000] * 3
    assoc.release()
    wait_for_associations_to_end(small_pdu_listener)
    assert inline_store.inline_store_of(acceptor).served == 3  # type: ignore[union-attr]
    snapshot = index.load_snapshot(study_uid)
    assert {instance.sop_instance_uid for series in snapshot.series for instance in series.instances} == {
        dataset.SOPInstanceUID for dataset in datasets
    }


def two_stores_observed(listener: DicomListener, tmp_path: Path, event: Any) -> tuple[str, Any, list[Any]]:
    """Two stores, each answered success, on an association whose acceptor has a handler bound to ``event``
    from before the first; returns the study UID, the acceptor and the events the handler got."""
    study_uid, datasets = study(tmp_path, 2)
    assoc = associate(listener.port, datasets[0])
    (acceptor,) = listener.associations
    observed: list[Any] = []
    acceptor.bind(event, observed.append)
    assert [assoc.send_c_store(dataset).Status for dataset in datasets] == [0x0000] * 2
    assoc.release()
    wait_for_associations_to_end(listener)
    return study_uid, acceptor, observed


def test_an_association_someone_observes_is_left_to_pynetdicom(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """A handler bound to EVT_DIMSE_RECV expects pynetdicom's decoded messages: that association's stores go
    pynetdicom's way, and still succeed."""
    study_uid, acceptor, messages = two_stores_observed(listener, tmp_path, evt.EVT_DIMSE_RECV)
    assert inline_store.inline_store_of(acceptor).served == 0  # type: ignore[union-attr]
    assert len(messages) == 2
    assert index.load_snapshot(study_uid).number_of_instances == 2


def test_dcmtk_storescu_is_served_inline(
    listener: DicomListener, index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[inline_store.InlineStore] = []
    original = inline_store.prepare

    def recording(assoc: Any) -> bool:
        prepared = original(assoc)
        served.append(inline_store.inline_store_of(assoc))  # type: ignore[arg-type]
        return prepared

    monkeypatch.setattr(inline_store, "prepare", recording)
    study_uid = new_study_uid()
    write_study(tmp_path / "study", study_uid, [SeriesSpec("MR", 5)])
    result = storescu(listener.port, tmp_path / "study")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_associations_to_end(listener)
    assert [store.served for store in served] == [5]
    assert index.load_snapshot(study_uid).number_of_instances == 5


def test_until_the_listener_lets_the_association_in_its_stores_take_pynetdicoms_way(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """pynetdicom accepts before the EVT_ESTABLISHED handlers run, and those may still refuse the peer: a store
    arriving before the listener lets the peer in is left to the association thread, which serves it only after them."""
    study_uid, datasets = study(tmp_path, 2)
    assoc = associate(listener.port, datasets[0])
    (acceptor,) = listener.associations
    inline = inline_store.inline_store_of(acceptor)
    assert inline is not None and inline.peer_let_in  # the listener let it in
    inline.peer_let_in = False  # as in the moment between the A-ASSOCIATE-AC and the EVT_ESTABLISHED handlers
    assert assoc.send_c_store(datasets[0]).Status == 0x0000
    assert inline.served == 0
    inline_store.let_in(acceptor)
    assert assoc.send_c_store(datasets[1]).Status == 0x0000
    assert inline.served == 1
    assoc.release()
    wait_for_associations_to_end(listener)
    assert index.load_snapshot(study_uid).number_of_instances == 2


def test_an_association_someone_observes_reading_pdus_is_read_by_pynetdicom(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """A handler bound to EVT_PDU_RECV expects pynetdicom's decoded PDUs: that association's PDUs are read by
    pynetdicom, and its stores still served inline."""
    study_uid, acceptor, pdus = two_stores_observed(listener, tmp_path, evt.EVT_PDU_RECV)
    inline = inline_store.inline_store_of(acceptor)
    assert inline is not None and inline.pdus_read == 0 and inline.served == 2
    assert len(pdus) >= 3  # the two stores' P-DATA-TFs and the release request
    assert index.load_snapshot(study_uid).number_of_instances == 2


def test_a_pdu_longer_than_what_is_read_whole_is_read_by_pynetdicom(
    listener: DicomListener, index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its buffer would be allocated before its bytes arrive: pynetdicom reads it, the store is served inline."""
    monkeypatch.setattr(inline_store, "LARGEST_PDU_READ_WHOLE", 64)
    study_uid, datasets = study(tmp_path, 1)
    assoc = associate(listener.port, datasets[0])
    (acceptor,) = listener.associations
    assert assoc.send_c_store(datasets[0]).Status == 0x0000
    assoc.release()
    wait_for_associations_to_end(listener)
    inline = inline_store.inline_store_of(acceptor)
    assert inline is not None and inline.served == 1 and inline.pdus_read == 0
    assert index.load_snapshot(study_uid).number_of_instances == 1


def test_a_p_data_tf_whose_item_overruns_it_aborts_the_association_not_the_listener(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """An invalid P-DATA-TF is what pynetdicom calls an invalid PDU (Evt19): the association is aborted, nothing
    is indexed, and the next association is served."""
    study_uid, datasets = study(tmp_path, 1)
    assoc = associate(listener.port, datasets[0])
    (acceptor,) = listener.associations
    item = struct.pack(">LB", 500, 1) + b"\x03"  # an item claiming 500 bytes in a 6-byte body
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted
    wait_for_associations_to_end(listener)
    assert inline_store.inline_store_of(acceptor).served == 0  # type: ignore[union-attr]
    again = associate(listener.port, datasets[0])
    assert again.send_c_store(datasets[0]).Status == 0x0000
    again.release()
    assert index.load_snapshot(study_uid).number_of_instances == 1
