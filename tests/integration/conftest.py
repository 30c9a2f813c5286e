"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from pacs_bridge.dicom.listener_settings import ListenerSettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.repository import Index


def listener_settings(receive_path: str = "fast_path", **overrides: object) -> ListenerSettings:
    """A listener (called AE title PACS_BRIDGE) on a free loopback port, receiving the ``receive_path`` way."""
    values: dict[str, object] = {"ae_title": "PACS_BRIDGE", "bind": "127.0.0.1", "port": 0}
    values.update(overrides)
    return ListenerSettings(fast_path=receive_path == "fast_path", **values)  # type: ignore[arg-type]


@pytest.fixture
def listener(index: Index, receive_path: str) -> Iterator[DicomListener]:
    """A DICOM listener indexing into ``index``, once with the fast path and once as stock pynetdicom."""
    running = DicomListener(listener_settings(receive_path), index, clock=lambda: datetime.now(UTC))
    running.start()
    yield running
    running.stop(drain_timeout_seconds=5)


@pytest.fixture
def fast_path_listener(index: Index) -> Iterator[DicomListener]:
    """A DICOM listener with the fast path on (for the tests of its pieces)."""
    running = DicomListener(listener_settings(), index, clock=lambda: datetime.now(UTC))
    running.start()
    assert running.fast_path.__class__.__name__ == "FastPath", running.fast_path
    yield running
    running.stop(drain_timeout_seconds=5)


@pytest.fixture
def listener_on_each_path(listener: DicomListener) -> DicomListener:
    """The listener, its C-STOREs served by the fast path's inline store or by stock pynetdicom's Storage SCP (the
    ``listener`` fixture runs on both receive paths): both must answer alike."""
    return listener
