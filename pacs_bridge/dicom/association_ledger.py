"""The listener's associations from EVT_ESTABLISHED to their end: the open-associations gauge and one end line.

pynetdicom raises EVT_RELEASED or EVT_ABORTED for an association that is released or aborted through its
state machine, but not for one whose DUL thread stops on an exception ("Exception in DUL.run(), aborting
association": a response it cannot encode, a command set it cannot decode). Counting on those events alone
leaves the gauge one higher and the association without an end line for each such failure. So every
association counted open here is ended exactly once: by its event, or else by the listener once its connection
is closed and its thread has stopped (``ended`` with ``cause="error"``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import structlog

from pacs_bridge.observe import BridgeObserver

log = structlog.get_logger("pacs_bridge.dicom")


@dataclass(slots=True)
class _Open:
    """An open association's end-line fields, and its C-STOREs by answer: ``stored`` (Success), ``try_later``
    (0xA7xx, out of resources: the sender's retry can succeed) and ``refused`` (any other failure: the bridge
    said no for good)."""

    peer: dict[str, Any]
    stored: int = 0
    try_later: int = 0
    refused: int = 0


class AssociationLedger:
    """The associations counted open, by association object (thread-safe)."""

    def __init__(self, observer: BridgeObserver) -> None:
        self._observer = observer
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}

    def opened(self, assoc: Any, peer: dict[str, Any]) -> None:
        """``assoc`` is established (``peer``: the fields that name it in its end line)."""
        with self._lock:
            if id(assoc) in self._open:
                return
            self._open[id(assoc)] = _Open(peer=dict(peer))
        try:
            self._observer.association_opened()
        except Exception:  # metrics must never change what a peer gets
            log.exception("metrics_failed")

    def count(self, assoc: Any, status: int) -> None:
        """One C-STORE of ``assoc`` answered ``status``."""
        with self._lock:
            record = self._open.get(id(assoc))
            if record is None:
                return
            if status == 0x0000:
                record.stored += 1
            elif status & 0xFF00 == 0xA700:
                record.try_later += 1
            else:
                record.refused += 1

    def is_open(self, assoc: Any) -> bool:
        with self._lock:
            return id(assoc) in self._open

    def ended(self, assoc: Any, *, released: bool, **fields: Any) -> bool:
        """``assoc`` has ended: the gauge goes down and its end line is written, the first time only. Returns
        whether this call ended it."""
        with self._lock:
            record = self._open.pop(id(assoc), None)
        if record is None:
            return False
        try:
            self._observer.association_closed()
        except Exception:
            log.exception("metrics_failed")
        name = "association_released" if released else "association_aborted"
        log.info(
            name, **record.peer, stored=record.stored, try_later=record.try_later, refused=record.refused, **fields
        )
        return True
