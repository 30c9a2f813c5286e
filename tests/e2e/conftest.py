"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RECEIVE_PATHS
from tests.support import bridge_process


@pytest.fixture(scope="session", autouse=True)
def bridges_receive_both_ways(receive_path: str) -> Iterator[str]:
    """Every end-to-end test runs twice: its bridges on the default configuration (``dicom.fast_path: auto``,
    ``dicom.listener_processes: auto``), then on the plain one (``off``, one process)."""
    previous = bridge_process.FAST_PATH, bridge_process.LISTENER_PROCESSES
    bridge_process.FAST_PATH = RECEIVE_PATHS[receive_path]
    bridge_process.LISTENER_PROCESSES = "auto" if RECEIVE_PATHS[receive_path] == "auto" else 1
    yield receive_path
    bridge_process.FAST_PATH, bridge_process.LISTENER_PROCESSES = previous
