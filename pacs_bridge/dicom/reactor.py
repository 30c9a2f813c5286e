"""Wake pynetdicom's association reactor as soon as a DIMSE message arrives, instead of after its 1 ms sleep.

Each association's reactor thread (``Association._run_reactor`` in pynetdicom 3.0) loops on
``time.sleep(0.001)`` and then looks for a complete DIMSE message that its DUL thread has queued. A C-STORE
that arrives just after the reactor went to sleep waits out the rest of that millisecond before our handler
runs; on one association, where the sender waits for each response before the next request, that latency is
paid once per instance (about 0.5 ms on average, against ~3-5 ms per instance in all).

``install`` puts a stand-in for the ``time`` module into ``pynetdicom.association``: its ``sleep`` is
``time.sleep`` for every caller except the reactor's 1 ms sleep on an association that ``attach`` prepared,
where it waits on an event instead, for the same millisecond at most. ``attach`` (at EVT_CONN_OPEN) swaps the
association's DIMSE message queue for one that sets that event on every ``put``. The reactor so behaves as
before, only woken early when there is something to serve; a missed wake-up costs at most the old 1 ms.
pynetdicom is pinned to 3.0.x; ``tests/integration/test_reactor_wakeup.py`` fails if this stops applying.
"""

from __future__ import annotations

import queue
import threading
import time
from types import ModuleType
from typing import Any

REACTOR_SLEEP = 0.001  # the literal in pynetdicom 3.0's Association._run_reactor
_WAKEUP_ATTRIBUTE = "_pacs_bridge_wakeup"


class _WakingQueue(queue.Queue[Any]):
    """The DIMSE provider's message queue; every ``put`` also sets the association's wake-up event."""

    def __init__(self, wakeup: threading.Event) -> None:
        super().__init__()
        self._wakeup = wakeup

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wakeup.set()


class ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``; see the module docstring."""

    def __init__(self, module: ModuleType) -> None:
        self._time = module
        self.woken = 0  # reactor sleeps cut short by a message (tests read it; not worth a lock)

    def sleep(self, seconds: float) -> None:
        wakeup = getattr(threading.current_thread(), _WAKEUP_ATTRIBUTE, None)
        if wakeup is None or seconds != REACTOR_SLEEP:
            self._time.sleep(seconds)
            return
        if wakeup.wait(seconds):
            # Cleared after the message was queued: the reactor takes it now. A message queued between the
            # wait and the clear is in the queue already and is taken too, or at the latest after 1 ms.
            wakeup.clear()
            self.woken += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)


def install() -> ReactorClock:
    """Make pynetdicom's association reactors wakeable (idempotent); returns the clock in place."""
    from pynetdicom import association

    module: Any = association
    clock = module.time
    if not isinstance(clock, ReactorClock):
        clock = ReactorClock(time)
        module.time = clock
    return clock


def attach(assoc: Any) -> bool:
    """Let ``assoc``'s reactor be woken by its DIMSE messages (at EVT_CONN_OPEN, before any is received).
    Returns False, changing nothing, when the association does not look like pynetdicom 3.0's."""
    dimse = getattr(assoc, "dimse", None)
    messages = getattr(dimse, "msg_queue", None)
    if not isinstance(assoc, threading.Thread) or type(messages) is not queue.Queue or not messages.empty():
        return False
    wakeup = threading.Event()
    dimse.msg_queue = _WakingQueue(wakeup)  # type: ignore[union-attr]
    setattr(assoc, _WAKEUP_ATTRIBUTE, wakeup)
    return True
