"""Fast path piece ``wakeups``: pynetdicom's two loops per association wait for work instead of polling for it.

**The association thread** waits for a DIMSE message or a release or abort, instead of polling every 1 ms.

Each association's own thread runs a loop (``Association._run_reactor`` in pynetdicom 3.0) that sleeps
``time.sleep(0.001)`` and then looks for a complete DIMSE message that its DUL thread has queued, and for an
A-RELEASE or A-ABORT that its DUL passed up. A request that arrives just after the loop went to sleep waits out
the rest of that millisecond, and every association, busy or idle, takes the GIL a thousand times a second to
look (with the ``inline_store`` piece, C-STOREs do not pass through this loop at all).

``patch`` puts ``AssociationModuleTime``, a stand-in for the ``time`` module, into ``pynetdicom.association``:
its ``sleep`` is ``time.sleep`` for every caller except the loop's 1 ms sleep on an association that
``prepare`` prepared, where it waits on an event instead, for at most ``ASSOCIATION_LONGEST_WAIT`` (its stop
flag, its DUL thread and its network timeout are still looked at that often). ``prepare`` (at EVT_CONN_OPEN)
swaps the association's DIMSE message queue and its DUL's queue to the user (``to_user_queue``: release and
abort) for ``WakingQueue``s that set that event on every ``put``. The event is cleared before the loop looks
at the queues, so nothing put after that look is missed: it ends the next wait at once.

**The DUL thread** (``DULServiceProvider.run_reactor``) reads PDUs from the socket and sends those the
association queues; whenever a pass finds nothing to do it sleeps ``_run_loop_delay`` (1 ms). Each PDU
received and each response to send therefore waits up to a millisecond, which on one association bounds the
rate, and every idle association wakes a thousand times a second. ``prepare`` gives the DUL a ``DulWakeup``:
an ``eventfd`` that its outgoing queue (``to_provider_queue``, a ``WakingQueue``) writes on every ``put``;
``DulModuleTime``, the stand-in ``time`` put into ``pynetdicom.dul``, turns that thread's sleep into a ``poll``
on the socket and the eventfd, for at most ``DUL_LONGEST_WAIT_MS`` (its ARTIM timer and its stop flag are
looked at on every pass, as in pynetdicom). The eventfd is level-triggered, so a PDU queued between the DUL's
look at the queue and its wait is never missed. Plain TCP sockets only: a TLS socket may hold decrypted bytes
that ``poll`` does not see, and keeps the 1 ms sleeps.

``patch`` and ``unpatch`` change the two modules' ``time``; only associations ``prepare`` prepared behave
differently. ``AssociationModuleTime.woken`` is what the self-check (self_check.py) reads to see that an
association thread was woken; the other wait counters let ``tests/integration/test_fastpath_wakeups.py`` tell
a wait from a poll, and that test fails if this stops applying.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

ASSOCIATION_LOOP_SLEEP = 0.001  # the literal in pynetdicom 3.0's Association._run_reactor loop
ASSOCIATION_LONGEST_WAIT = 0.05  # a waiting association thread still looks at its stop flag and timers this often
KILL_SLEEP = 0.01  # the literal in pynetdicom 3.0's Association.kill, between looks at whether its DUL has stopped
_WAKEUP_ATTRIBUTE = "_pacs_bridge_wakeup"
DUL_LONGEST_WAIT_MS = 50  # a waiting DUL thread still looks at its ARTIM timer and stop flag this often
_POLL_IN = select.POLLIN | select.POLLPRI


class WakingQueue(queue.Queue[Any]):
    """A queue that wakes whoever waits for it on every ``put``: the DIMSE provider's message queue (sets the
    association thread's event), the DUL's outgoing queue (writes its eventfd)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class AssociationModuleTime:
    """Stands in for the ``time`` module inside ``pynetdicom.association``; see the module docstring."""

    def __init__(self, module: ModuleType) -> None:
        self._time = module
        self.waits = 0  # waits begun by association threads (counters without a lock: a lost count only reads low)
        self.woken = 0  # waits cut short by a message, a release or an abort

    def sleep(self, seconds: float) -> None:
        wakeup = getattr(threading.current_thread(), _WAKEUP_ATTRIBUTE, None)
        if wakeup is not None and seconds == KILL_SLEEP:
            # A released or aborted association waits for its DUL to stop, which it does once the peer has closed
            # the connection: looking each millisecond frees its slot (max_associations) at once, not up to 10 ms
            # later. The association thread, woken by the release, mostly gets here before the peer has closed.
            self._time.sleep(ASSOCIATION_LOOP_SLEEP)
            return
        if wakeup is None or seconds != ASSOCIATION_LOOP_SLEEP:
            self._time.sleep(seconds)
            return
        self.waits += 1
        if wakeup.wait(ASSOCIATION_LONGEST_WAIT):
            # Cleared before the loop looks at its queues: what was put before is taken in this pass, what is
            # put after sets the event again.
            wakeup.clear()
            self.woken += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)


class DulWakeup:
    """What one DUL thread waits on: its socket, and an eventfd written whenever it has something to send."""

    __slots__ = ("__weakref__", "_closer", "_event_fd", "_lock", "_poller", "_socket", "_socket_fd", "polls", "woken")

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._socket_fd = sock.fileno()
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closed by close() (at EVT_CONN_CLOSE, or when the loop stops), else with this object (it runs once).
        self._closer = weakref.finalize(self, os.close, self._event_fd)
        self._lock = threading.Lock()
        self._poller = select.poll()
        self._poller.register(self._socket_fd, _POLL_IN)
        self._poller.register(self._event_fd, _POLL_IN)
        self.polls = 0  # waits begun (counters without a lock: a lost count only reads low)
        self.woken = 0  # waits ended early, by a PDU or a primitive to send

    @property
    def is_closed(self) -> bool:
        """Whether its eventfd is closed: the DUL thread sleeps plainly from here on."""
        return self._event_fd < 0

    def wake(self) -> None:
        with self._lock:  # never write to a closed eventfd's number, which may belong to another file by now
            if self._event_fd >= 0:
                os.eventfd_write(self._event_fd, 1)

    def wait(self, dul: Any, seconds: float) -> None:
        """Sleep like the DUL would, but only until its socket is readable or a primitive is queued."""
        transport = getattr(dul, "socket", None)
        stopping = (
            getattr(dul, "_kill_thread", True)
            or transport is None
            or transport.socket is None
            or getattr(transport, "_is_connected", True) is False  # pynetdicom no longer reads it
        )
        if stopping or self._event_fd < 0 or self._socket.fileno() != self._socket_fd:
            self.close()  # the loop ends or the connection is closed: the plain sleep from here on
            time.sleep(seconds)
            return
        self.polls += 1
        events = self._poller.poll(DUL_LONGEST_WAIT_MS)
        if any(fd == self._event_fd for fd, _ in events):
            self.woken += 1
            with self._lock:
                if self._event_fd >= 0:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._event_fd)
        elif events:
            self.woken += 1

    def close(self) -> None:
        with self._lock:
            if self._event_fd >= 0:
                self._poller.unregister(self._event_fd)
                self._event_fd = -1
                self._closer()


class DulModuleTime:
    """Stands in for the ``time`` module inside ``pynetdicom.dul``; see the module docstring."""

    def __init__(self, module: ModuleType) -> None:
        self._time = module

    def sleep(self, seconds: float) -> None:
        dul = threading.current_thread()
        wakeup = getattr(dul, _WAKEUP_ATTRIBUTE, None)
        if wakeup is None or seconds != getattr(dul, "_run_loop_delay", None):
            self._time.sleep(seconds)
            return
        wakeup.wait(dul, seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)


def patch() -> AssociationModuleTime:
    """Make pynetdicom's association threads and DUL threads wakeable (idempotent); returns the stand-in
    ``time`` of ``pynetdicom.association``, whose counters show the association threads' waits."""
    from pynetdicom import association, dul

    module: Any = association
    association_time = module.time
    if not isinstance(association_time, AssociationModuleTime):
        association_time = AssociationModuleTime(time)
        module.time = association_time
    dul_module: Any = dul
    if not isinstance(dul_module.time, DulModuleTime):
        dul_module.time = DulModuleTime(time)
    return association_time


def unpatch() -> None:
    """Give pynetdicom's association and DUL modules the ``time`` module back."""
    from pynetdicom import association, dul

    module: Any = association
    dul_module: Any = dul
    module.time = time
    dul_module.time = time


def prepare(assoc: Any) -> bool:
    """Let ``assoc``'s own thread be woken by its DIMSE messages, releases and aborts (at EVT_CONN_OPEN, before any
    is received). Returns False, changing nothing, when the association does not look like pynetdicom 3.0's."""
    dimse = getattr(assoc, "dimse", None)
    messages = getattr(dimse, "msg_queue", None)
    provider = getattr(assoc, "dul", None)
    to_user = getattr(provider, "to_user_queue", None)
    if not isinstance(assoc, threading.Thread) or not all(
        type(waiting) is queue.Queue and waiting.empty() for waiting in (messages, to_user)
    ):
        return False
    wakeup = threading.Event()
    dimse.msg_queue = WakingQueue(wakeup.set)  # type: ignore[union-attr]
    provider.to_user_queue = WakingQueue(wakeup.set)  # type: ignore[union-attr]
    setattr(assoc, _WAKEUP_ATTRIBUTE, wakeup)
    _prepare_dul(provider)
    return True


def connection_closed(assoc: Any) -> None:
    """``assoc``'s connection is closed (EVT_CONN_CLOSE, on its DUL thread): close its DUL's eventfd now rather
    than when the association is collected. Its thread, if it loops once more, sleeps plainly."""
    wakeup = dul_wakeup(assoc)
    if wakeup is not None:
        wakeup.close()


def dul_wakeup(assoc: Any) -> DulWakeup | None:
    """What ``assoc``'s DUL thread waits on, when ``prepare`` gave it one (plain TCP only)."""
    wakeup = getattr(getattr(assoc, "dul", None), _WAKEUP_ATTRIBUTE, None)
    return wakeup if isinstance(wakeup, DulWakeup) else None


def _prepare_dul(dul: Any) -> bool:
    """Let ``dul``'s thread wait on its socket and its outgoing queue (before the thread starts)."""
    if not hasattr(os, "eventfd") or not isinstance(dul, threading.Thread) or dul.is_alive():
        return False
    provider: Any = dul
    outgoing = getattr(dul, "to_provider_queue", None)
    transport = getattr(dul, "socket", None)
    raw = getattr(transport, "socket", None)
    if not isinstance(raw, socket.socket) or isinstance(raw, ssl.SSLSocket):
        return False
    if type(outgoing) is not queue.Queue or not outgoing.empty():
        return False
    if not isinstance(getattr(dul, "_run_loop_delay", None), float):
        return False
    wakeup = DulWakeup(raw)
    provider.to_provider_queue = WakingQueue(wakeup.wake)
    setattr(provider, _WAKEUP_ATTRIBUTE, wakeup)
    return True
