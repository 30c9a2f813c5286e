"""Associations share the listener's supported presentation contexts instead of deep-copying them (SharedContexts)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, transport
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from pacs_bridge.dicom.fastpath.shared_contexts import SharedContexts
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.support.associations import wait_for_associations_to_end
from tests.support.studies import SeriesSpec, new_study_uid, write_study


@pytest.fixture
def listener(fast_path_listener: DicomListener) -> DicomListener:
    """The pieces under test are the fast path's: this module's listener has it on."""
    return fast_path_listener


def test_pynetdicom_copies_the_server_contexts_with_deepcopy_for_each_association() -> None:
    """The copy SharedContexts makes cheap: if a release stops deep-copying, this adaptation is moot and this
    fails."""
    source = inspect.getsource(transport.RequestHandler._create_association)
    assert "assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)" in source


def test_a_deep_copy_is_a_new_list_of_the_same_contexts() -> None:
    contexts = SharedContexts(AE().supported_contexts)
    copied = copy.deepcopy(contexts)
    assert copied is not contexts
    assert all(mine is theirs for mine, theirs in zip(copied, contexts, strict=True))


def _described(contexts: list[object]) -> list[str]:
    return [repr(vars(context)) for context in contexts]


def test_associations_negotiate_on_the_shared_contexts_and_leave_them_unchanged(
    listener: DicomListener, index: Index, tmp_path: Path
) -> None:
    """Two associations in turn are given the very same context objects, which negotiation leaves as they were."""
    study_uid = new_study_uid()
    (path,) = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 1)])
    dataset = dcmread(path)
    seen: list[list[object]] = []
    for _ in range(2):
        ae = AE()
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        ae.add_requested_context(MRImageStorage, "1.2.3.4.5.6")  # refused: a transfer syntax no one knows
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established
        (acceptor,) = listener.associations
        seen.append(list(acceptor.acceptor.supported_contexts))
        assert assoc.send_c_store(dataset).Status == 0x0000
        assoc.release()
        wait_for_associations_to_end(listener)
    first, second = seen
    assert all(mine is theirs for mine, theirs in zip(first, second, strict=True))
    assert _described(second) == _described(first)
    assert index.load_snapshot(study_uid).number_of_instances == 1
