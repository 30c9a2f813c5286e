"""PS3.4: a C-STORE's dataset must be the instance its request names, of the SOP class its context was negotiated
for. pynetdicom, scripted below its SCU API, sends requests whose Affected SOP Class or Instance UID, or
presentation context, disagree with the dataset; the listener (real index, SQLite and PostgreSQL) answers 0xA900
("Data Set does not match SOP Class") or 0xC000 and indexes nothing, both when its C-STOREs are served inline
(dicom/fastpath/inline_store.py) and by stock pynetdicom's Storage SCP.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_STORE

from pacs_bridge.dicom.fastpath import inline_store
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.support.associations import wait_for_associations_to_end
from tests.support.dcmtk import storescu
from tests.support.raw_files import encoded
from tests.support.studies import make_dataset, uid, write_file

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
MR = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage


@pytest.fixture
def listener(listener_on_each_path: DicomListener) -> DicomListener:
    return listener_on_each_path


def store(listener: DicomListener, *, context: str, request_class: str, request_instance: str, dataset: Any) -> Any:
    """One C-STORE on its own association with one presentation context (``context``, Explicit VR Little
    Endian): the request names ``request_class`` and ``request_instance``, whatever ``dataset`` holds. Returns
    the response primitive, after checking which path served it. (pynetdicom's send_c_store takes both UIDs from
    the dataset or file meta, and the context from them: the request is sent as send_c_store sends it.)"""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [
        build_context(context, [ExplicitVRLittleEndian]),
        build_context(MR if context == CT else CT),
    ]
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    (acceptor,) = listener.associations
    inline = inline_store.inline_store_of(acceptor)
    served_inline = inline.served if inline is not None else None
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == context)
    response = send(assoc, context_id, request_class=request_class, request_instance=request_instance, data_set=dataset)
    assoc.release()
    wait_for_associations_to_end(listener)
    if inline is not None:  # served inline: this path answered
        assert inline.served == (served_inline or 0) + 1
    return response


def dataset(sop_class: str, instance: str = "1.1.1") -> Any:
    return make_dataset(SOPClassUID=sop_class, SOPInstanceUID=uid(instance), Modality="MR" if sop_class == MR else "CT")


MISMATCH_ROWS = [
    # (presentation context, request's Affected SOP Class, dataset's SOP class, status)
    (CT, CT, MR, 0xA900),  # an MR dataset sent as a CT image
    (CT, MR, MR, 0xA900),  # an MR request and dataset on the CT context: not indexed as MR
    (CT, MR, CT, 0xA900),  # a CT dataset, but the request names MR
    (CT, CT, CT, 0x0000),  # all three agree: stored
]


@pytest.mark.parametrize(
    ("context", "request_class", "dataset_class", "status"),
    MISMATCH_ROWS,
    ids=["dataset MR", "request and dataset MR on CT", "request MR", "all CT"],
)
def test_a_dataset_of_another_sop_class_than_its_request_or_context_is_refused_with_a900(
    listener: DicomListener, index: Index, context: str, request_class: str, dataset_class: str, status: int
) -> None:
    """0xA900 with an ErrorComment naming SOPClassUID, and nothing indexed; Success only when all agree."""
    response = store(
        listener,
        context=context,
        request_class=request_class,
        request_instance=uid("1.1.1"),
        dataset=dataset(dataset_class),
    )

    assert response.Status == status
    if status == 0xA900:
        assert response.ErrorComment.startswith("SOPClassUID (0008,0016)")
        assert index.study_status(uid("1")) is None
    else:
        assert index.load_snapshot(uid("1")).number_of_instances == 1


def test_a_dataset_of_another_instance_than_its_request_is_refused_and_neither_uid_indexed(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """The request names instance 1.1.1, the dataset is 1.1.2: 0xC000 naming SOPInstanceUID; the study holds
    neither; storescu then stores an instance of the same study."""
    response = store(
        listener, context=CT, request_class=CT, request_instance=uid("1.1.1"), dataset=dataset(CT, "1.1.2")
    )

    assert response.Status == 0xC000
    assert response.ErrorComment.startswith("SOPInstanceUID (0008,0018)")
    assert index.study_status(uid("1")) is None
    sent = storescu(listener.port, write_file(dataset(CT, "1.1.3"), tmp_path / "good.dcm"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert index.load_snapshot(uid("1")).number_of_instances == 1


def send(assoc: Any, context_id: int, *, request_class: str, request_instance: str, data_set: Any) -> Any:
    """One C-STORE request on ``assoc``, sent below send_c_store (which takes the SOP class from the dataset);
    the response primitive, or None when the association ended instead."""
    request = C_STORE()
    request.MessageID = 1
    request.Priority = 2
    request.AffectedSOPClassUID = request_class
    request.AffectedSOPInstanceUID = request_instance
    request.DataSet = BytesIO(encoded(data_set))
    assoc._reactor_checkpoint.clear()  # as send_c_store does: its reactor must not take the response
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, context_id)
    _, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    return response


@pytest.mark.parametrize("request_class", ["31", "1.2.3.4.5", "1.2.840.10008.1.1"], ids=["31", "unknown", "echo"])
def test_a_request_naming_no_storage_sop_class_is_refused_with_a900_and_the_association_goes_on(
    listener: DicomListener, index: Index, request_class: str
) -> None:
    """On the CT context, a C-STORE whose Affected SOP Class UID is no storage SOP class (a bare "31", an unknown
    UID, Verification's): 0xA900 naming SOPClassUID, nothing indexed, and the next C-STORE on the same
    association is stored; on both receive paths (stock pynetdicom, which picks the service by that UID alone,
    would abort the association: dicom/message_screen.py hands it to the Storage SCP)."""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [build_context(CT, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    (context_id,) = (cx.context_id for cx in assoc.accepted_contexts)

    odd = send(assoc, context_id, request_class=request_class, request_instance=uid("1.1.1"), data_set=dataset(CT))
    assert assoc.is_established
    good = send(assoc, context_id, request_class=CT, request_instance=uid("1.1.2"), data_set=dataset(CT, "1.1.2"))
    assoc.release()
    wait_for_associations_to_end(listener)

    assert odd is not None and odd.Status == 0xA900
    assert odd.ErrorComment.startswith("SOPClassUID (0008,0016)")
    assert good is not None and good.Status == 0x0000
    assert index.load_snapshot(uid("1")).number_of_instances == 1
