"""pynetdicom's and pydicom's process-wide settings a running listener (dicom/scp.py) depends on: set when the
first listener of the process starts, put back when the last one stops.

- pynetdicom writes a C-STORE it receives itself to a temporary file (``STORE_RECV_CHUNKED_DATASET``: memory stays
  flat for any instance size), in a temporary directory of the process's own (dicom/received.py; the listener
  deletes the files left behind there);
- its standard per-message log handlers are off (``LOG_HANDLER_LEVEL``: they would read every received data set
  whole);
- pydicom does not check the values it decodes against their VR (extraction checks what the index needs,
  dicom/extract.py; those checks only ever produced warnings).

``STORE_RECV_CHUNKED_DATASET`` and ``LOG_HANDLER_LEVEL`` live in pynetdicom's ``_config`` module, for pynetdicom 3.x
(pyproject.toml pins it).
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import _config as _pynetdicom_config

from pacs_bridge.dicom.received import claim_receive_directory, release_receive_directory


class _ListenerSwitches:
    """pynetdicom's and pydicom's process-wide settings a running listener needs (see the module docstring): set
    when the first listener of the process starts, restored when the last one stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._before: tuple[bool, str, Any] | None = None

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._before = (
                    _pynetdicom_config.STORE_RECV_CHUNKED_DATASET,
                    _pynetdicom_config.LOG_HANDLER_LEVEL,
                    pydicom_config.settings.reading_validation_mode,
                )
                _pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
                claim_receive_directory()
                _pynetdicom_config.LOG_HANDLER_LEVEL = "none"
                pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
            self._holders += 1

    def let_go(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._before is not None:
                chunked, log_level, validation = self._before
                _pynetdicom_config.STORE_RECV_CHUNKED_DATASET = chunked
                release_receive_directory()
                _pynetdicom_config.LOG_HANDLER_LEVEL = log_level
                pydicom_config.settings.reading_validation_mode = validation
                self._before = None


LISTENER_SWITCHES = _ListenerSwitches()
