"""Accepting from the listening socket without spinning when the process is out of file descriptors (EMFILE and
the like): the front door's accept loop, and the main process's when listener processes share one port
(``listener_processes.py``)."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("pacs_bridge.dicom")

Address = tuple[str, int]
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPTS_PER_WAKEUP = 64
_FIRST_PAUSE_SECONDS = 0.05
_LONGEST_PAUSE_SECONDS = 1.0
_REPORT_PAUSES_EVERY_SECONDS = 60.0


class Acceptor:
    """Accepts from a non-blocking listening socket, and pauses rather than spin when out of file descriptors.

    ``make_room`` is asked first to close something (it returns whether it did); when it cannot, ``accept_some``
    returns what it has and ``paused_until`` tells the caller when to watch the listening socket again. Running
    short of descriptors tends to last and to flap (each connection that ends lets one more in), so it is logged
    at most once per ``_REPORT_PAUSES_EVERY_SECONDS`` (``accept_paused``, with the failures since the last
    report), and so is the first success after it (``accept_resumed``)."""

    def __init__(self, listening: socket.socket, *, make_room: Callable[[], bool] = lambda: False) -> None:
        self.listening = listening
        self._make_room = make_room
        self.paused_until: float | None = None
        self._pause = _FIRST_PAUSE_SECONDS
        self._failures = 0  # since the last accept_paused event
        self._paused_reported_at: float | None = None
        self._resumed_reported_at: float | None = None
        self._resume_pending = False

    def accept_some(self) -> list[tuple[socket.socket, Address]]:
        """What the listening socket has for us (at most ``_ACCEPTS_PER_WAKEUP`` connections)."""
        accepted: list[tuple[socket.socket, Address]] = []
        while len(accepted) < _ACCEPTS_PER_WAKEUP:
            try:
                sock, address = self.listening.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    continue  # ECONNABORTED and the like: that connection is gone, the next may be fine
                if self._make_room():
                    continue
                self._pause_for(exc)
                break
            self._pause = _FIRST_PAUSE_SECONDS
            if self._resume_pending and _due(self._resumed_reported_at):
                log.info("accept_resumed")
                self._resume_pending = False
                self._resumed_reported_at = time.monotonic()
            accepted.append((sock, (str(address[0]), int(address[1]))))
        return accepted

    def _pause_for(self, error: OSError) -> None:
        self._failures += 1
        self._resume_pending = True
        if _due(self._paused_reported_at):
            log.error(
                "accept_paused",
                error=str(error),
                failed_accepts=self._failures,
                hint="the process is out of file descriptors: raise LimitNOFILE (ulimit -n) or lower "
                "dicom.max_pending_connections and dicom.max_associations",
            )
            self._failures = 0
            self._paused_reported_at = time.monotonic()
        self.paused_until = time.monotonic() + self._pause
        self._pause = min(self._pause * 2, _LONGEST_PAUSE_SECONDS)

    def resume_if_due(self, now: float) -> bool:
        """True once a pause is over (the caller watches the listening socket again)."""
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            return True
        return False


def _due(reported_at: float | None) -> bool:
    return reported_at is None or time.monotonic() - reported_at >= _REPORT_PAUSES_EVERY_SECONDS
