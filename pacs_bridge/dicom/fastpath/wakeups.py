"""Fast path piece ``wakeups``: pynetdicom's two loops per association wait for work instead of polling for it.

**The association reactor** waits for a DIMSE message or a release or abort, instead of polling every 1 ms.

Each association's reactor thread (``Association._run_reactor`` in pynetdicom 3.0) loops on
``time.sleep(0.001)`` and then looks for a complete DIMSE message that its DUL thread has queued, and for an
A-RELEASE or A-ABORT that its DUL passed up. A request that arrives just after the reactor went to sleep
waits out the rest of that millisecond, and every association, busy or idle, takes the GIL a thousand times a
second to look (with the ``inline_store`` piece, C-STOREs do not pass through this loop at all).

``install`` puts a stand-in for the ``time`` module into ``pynetdicom.association``: its ``sleep`` is
``time.sleep`` for every caller except the reactor's 1 ms sleep on an association that ``attach`` prepared,
where it waits on an event instead, for at most ``REACTOR_LONGEST_WAIT`` (its stop flag, its DUL thread and its
network timeout are still looked at that often). ``attach`` (at EVT_CONN_OPEN) swaps the association's DIMSE
message queue and its DUL's queue to the user (``to_user_queue``: release and abort) for ones that set that
event on every ``put``. The event is cleared before the reactor looks at the queues, so nothing put after
that look is missed: it ends the next wait at once.

**The DUL thread** (``DULServiceProvider.run_reactor``) reads PDUs from the socket and sends those the
association queues; whenever a pass finds nothing to do it sleeps ``_run_loop_delay`` (1 ms). Each PDU
received and each response to send therefore waits up to a millisecond, which on one association bounds the
rate, and every idle association wakes a thousand times a second. ``attach`` gives the DUL an ``eventfd``
that its outgoing queue (``to_provider_queue``) writes on every ``put``; the stand-in ``time`` put into
``pynetdicom.dul`` turns that thread's sleep into a ``poll`` on the socket and the eventfd, for at most
``DUL_LONGEST_WAIT_MS`` (its ARTIM timer and its stop flag are looked at on every pass, as before). The eventfd
is level-triggered, so a PDU queued between the DUL's look at the queue and its wait is never missed. Plain
TCP sockets only: a TLS socket may hold decrypted bytes that ``poll`` does not see, and keeps the 1 ms
sleeps.

``install`` and ``uninstall`` change the two modules' ``time``; only associations ``attach`` prepared behave
differently. ``tests/integration/test_fastpath_wakeups.py`` fails if this stops applying.
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

REACTOR_SLEEP = 0.001  # the literal in pynetdicom 3.0's Association._run_reactor
REACTOR_LONGEST_WAIT = 0.05  # a waiting association reactor still looks at its stop flag and timers this often
KILL_SLEEP = 0.01  # the literal in pynetdicom 3.0's Association.kill, between looks at whether its DUL has stopped
_WAKEUP_ATTRIBUTE = "_pacs_bridge_wakeup"
DUL_LONGEST_WAIT_MS = 50  # a waiting DUL thread still looks at its ARTIM timer and stop flag this often
_POLL_IN = select.POLLIN | select.POLLPRI


class _WakingQueue(queue.Queue[Any]):
    """A queue that wakes whoever waits for it on every ``put``: the DIMSE provider's message queue (sets the
    association reactor's event), the DUL's outgoing queue (writes its eventfd)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.association``; see the module docstring."""

    def __init__(self, module: ModuleType) -> None:
        self._time = module
        self.waits = 0  # reactor waits begun (tests read these counters; not worth a lock)
        self.woken = 0  # reactor waits cut short by a message, a release or an abort

    def sleep(self, seconds: float) -> None:
        wakeup = getattr(threading.current_thread(), _WAKEUP_ATTRIBUTE, None)
        if wakeup is not None and seconds == KILL_SLEEP:
            # A released or aborted association waits for its DUL to stop, which it does once the peer has closed
            # the connection: looking each millisecond frees its slot (max_associations) at once, not up to 10 ms
            # later. The reactor, woken by the release, gets here before the peer has closed more often than not.
            self._time.sleep(REACTOR_SLEEP)
            return
        if wakeup is None or seconds != REACTOR_SLEEP:
            self._time.sleep(seconds)
            return
        self.waits += 1
        if wakeup.wait(REACTOR_LONGEST_WAIT):
            # Cleared before the reactor looks at its queues: what was put before is taken in this pass, what is
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
        self.polls = 0  # waits begun (tests read these counters; not worth a lock)
        self.woken = 0  # waits ended early, by a PDU or a primitive to send

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


class DulClock:
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


def install() -> ReactorClock:
    """Make pynetdicom's association reactors and DUL threads wakeable (idempotent); returns the association
    reactors' clock."""
    from pynetdicom import association, dul

    module: Any = association
    clock = module.time
    if not isinstance(clock, ReactorClock):
        clock = ReactorClock(time)
        module.time = clock
    dul_module: Any = dul
    if not isinstance(dul_module.time, DulClock):
        dul_module.time = DulClock(time)
    return clock


def uninstall() -> None:
    """Give pynetdicom's association and DUL modules the ``time`` module back."""
    from pynetdicom import association, dul

    module: Any = association
    dul_module: Any = dul
    module.time = time
    dul_module.time = time


def attach(assoc: Any) -> bool:
    """Let ``assoc``'s reactor be woken by its DIMSE messages, releases and aborts (at EVT_CONN_OPEN, before any
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
    dimse.msg_queue = _WakingQueue(wakeup.set)  # type: ignore[union-attr]
    provider.to_user_queue = _WakingQueue(wakeup.set)  # type: ignore[union-attr]
    setattr(assoc, _WAKEUP_ATTRIBUTE, wakeup)
    _attach_dul(provider)
    return True


def detach(assoc: Any) -> None:
    """``assoc``'s connection is closed (EVT_CONN_CLOSE, on its DUL thread): close its DUL's eventfd now rather
    than when the association is collected. Its thread, if it loops once more, sleeps plainly."""
    wakeup = getattr(getattr(assoc, "dul", None), _WAKEUP_ATTRIBUTE, None)
    if isinstance(wakeup, DulWakeup):
        wakeup.close()


def _attach_dul(dul: Any) -> bool:
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
    provider.to_provider_queue = _WakingQueue(wakeup.wake)
    setattr(provider, _WAKEUP_ATTRIBUTE, wakeup)
    return True
