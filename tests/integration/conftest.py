"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from pacs_bridge.dicom import inline_store
from pacs_bridge.dicom.scp import DicomListener, ListenerSettings
from pacs_bridge.index.repository import Index


@pytest.fixture
def listener(index: Index) -> Iterator[DicomListener]:
    """A DICOM listener (called AE title PACS_BRIDGE) on a free loopback port, indexing into ``index``."""
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=lambda: datetime.now(UTC)
    )
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


@pytest.fixture(params=["inline", "pynetdicom"])
def listener_on_each_path(
    request: pytest.FixtureRequest, index: Index, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DicomListener]:
    """The listener, its C-STOREs served inline (dicom/inline_store.py, the default) or, with inline serving never
    attached, by pynetdicom's own Storage SCP: both must answer alike."""
    if request.param == "pynetdicom":
        monkeypatch.setattr(inline_store, "attach", lambda _assoc: False)
    running = DicomListener(
        ListenerSettings(ae_title="PACS_BRIDGE", bind="127.0.0.1", port=0), index, clock=lambda: datetime.now(UTC)
    )
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)
