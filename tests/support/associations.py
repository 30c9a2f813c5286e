"""Waiting for a listener's associations in tests."""

from __future__ import annotations

import threading
import time

from pacs_bridge.dicom.scp import DicomListener


def wait_for_associations_to_end(listener: DicomListener, timeout: float = 10.0) -> None:
    """Until ``listener`` serves no association (a released one ends on its own threads), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while listener.associations and time.monotonic() < deadline:
        threading.Event().wait(0.02)
