"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RECEIVE_PATHS
from tests.support import bridge_process


@pytest.fixture(scope="session", autouse=True)
def bridges_receive_both_ways(receive_path: str) -> Iterator[str]:
    """Every end-to-end test runs twice: its bridges with ``dicom.fast_path: auto``, then with ``off``."""
    previous = bridge_process.FAST_PATH
    bridge_process.FAST_PATH = RECEIVE_PATHS[receive_path]
    yield receive_path
    bridge_process.FAST_PATH = previous
