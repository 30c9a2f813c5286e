"""dicom.fast_path on a real listener: which receive path serves, and what the start log says."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom import fastpath
from pacs_bridge.dicom.fastpath import inline_store
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index
from tests.integration.conftest import listener_settings
from tests.support.associations import wait_for_associations_to_end


@pytest.fixture
def started(index: Index, request: pytest.FixtureRequest) -> Iterator[DicomListener]:
    running = DicomListener(listener_settings(request.param), index, clock=lambda: datetime.now(UTC))
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


def acceptor_of(listener: DicomListener) -> tuple[Any, Any]:
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    (acceptor,) = listener.associations
    return assoc, acceptor


@pytest.mark.parametrize("started", ["fast_path"], indirect=True)
def test_auto_with_this_pynetdicom_serves_on_every_piece_of_the_fast_path(started: DicomListener) -> None:
    assert started.fast_path == fastpath.FastPath(frozenset(fastpath.PIECES))
    assoc, acceptor = acceptor_of(started)
    try:
        assert inline_store.inline_store_of(acceptor) is not None
    finally:
        assoc.release()
        wait_for_associations_to_end(started)


@pytest.mark.parametrize("started", ["stock"], indirect=True)
def test_off_serves_with_stock_pynetdicom_even_where_the_fast_path_is_installed(started: DicomListener) -> None:
    """The pieces are process-wide patches, installed by earlier listeners of this test run; an association of
    a listener with the fast path off is left exactly as pynetdicom made it."""
    fastpath.enable()
    assert started.fast_path == fastpath.FastPathUnavailable("dicom.fast_path is off")
    assoc, acceptor = acceptor_of(started)
    try:
        assert inline_store.inline_store_of(acceptor) is None
        assert type(acceptor.dimse.msg_queue) is queue.Queue
        assert type(acceptor.dul.to_provider_queue) is queue.Queue
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
        wait_for_associations_to_end(started)
