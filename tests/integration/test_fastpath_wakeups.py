"""pynetdicom's association thread and DUL thread wait for work instead of polling (dicom/fastpath/wakeups.py)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, association, dul
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.dicom.fastpath import wakeups
from pacs_bridge.dicom.scp import DicomListener
from tests.support.associations import wait_for_associations_to_end
from tests.support.bridge_process import wait_for

REQUESTS = 5


@pytest.fixture
def listener(fast_path_listener: DicomListener) -> DicomListener:
    """The pieces under test are the fast path's: this module's listener has it on."""
    return fast_path_listener


def test_the_association_loop_sleep_is_the_one_the_patch_replaces() -> None:
    """pynetdicom 3.0's association loop (``_run_reactor``) sleeps exactly ``ASSOCIATION_LOOP_SLEEP`` on
    ``association.time``, and ``kill`` waits for its DUL in ``KILL_SLEEP`` steps: if a release changes a literal
    or the import, the patch stops applying and this fails."""
    source = Path(association.__file__).read_text(encoding="utf-8")
    loop_body = source.split("def _run_reactor(self)", 1)[1].split("\n    def ", 1)[0]
    assert f"time.sleep({wakeups.ASSOCIATION_LOOP_SLEEP})" in loop_body
    kill_body = source.split("    def kill(self)", 1)[1].split("\n    def ", 1)[0]
    assert f"time.sleep({wakeups.KILL_SLEEP})" in kill_body and "self.dul.stop_dul()" in kill_body
    assert "\nimport time\n" in source


def verification_association(listener: DicomListener) -> tuple[Any, Any]:
    """A Verification association with ``listener``: our requestor and the listener's acceptor."""
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    (acceptor,) = listener.associations
    return assoc, acceptor


def test_each_request_pynetdicom_serves_wakes_the_thread_of_its_association(listener: DicomListener) -> None:
    """Five C-ECHOs on one association (C-STOREs are served on the DUL thread, see dicom/fastpath/inline_store.py): the
    acceptor's message queue is the waking one, and its association thread was woken at least once per request rather
    than only finding them after its sleeps."""
    association_time = wakeups.patch()
    module: Any = association
    assert module.time is association_time
    assoc, acceptor = verification_association(listener)
    assert isinstance(acceptor.dimse.msg_queue, wakeups.WakingQueue)
    assert not isinstance(assoc.dimse.msg_queue, wakeups.WakingQueue)  # our own SCU is left alone
    woken_before = association_time.woken
    for _ in range(REQUESTS):
        assert assoc.send_c_echo().Status == 0x0000
    woken = association_time.woken - woken_before
    assoc.release()
    wait_for_associations_to_end(listener)
    assert woken >= REQUESTS


def test_an_idle_association_thread_waits_and_a_release_wakes_it(
    listener: DicomListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half a second of silence costs the acceptor's association thread about ten waits (stock pynetdicom: ~500 polls);
    the peer's A-RELEASE, passed up by its DUL, ends the wait it is in."""
    association_time = wakeups.patch()
    assoc, acceptor = verification_association(listener)
    assert isinstance(acceptor.dul.to_user_queue, wakeups.WakingQueue)
    threading.Event().wait(0.05)
    waits_before = association_time.waits
    threading.Event().wait(0.5)
    assert association_time.waits - waits_before <= 30  # 0.5 / ASSOCIATION_LONGEST_WAIT, and room for a slow machine
    # The release must find the thread in a wait: with 50 ms waits it may arrive while the thread, its wait just
    # run out, is looking at its queues, and it then finds the release there without being woken. So the thread
    # is let into one wait that only a wake-up ends before the release is sent.
    monkeypatch.setattr(wakeups, "ASSOCIATION_LONGEST_WAIT", 60.0)
    waits_now = association_time.waits
    wait_for(lambda: association_time.waits > waits_now, timeout=5, what="the association thread's next wait")
    woken_before = association_time.woken
    assoc.release()
    wait_for_associations_to_end(listener)
    assert association_time.woken > woken_before
    assert acceptor.is_released


def test_the_dul_sleep_and_queue_are_the_ones_the_patch_replaces() -> None:
    """pynetdicom 3.0's DUL loop sleeps ``self._run_loop_delay`` on ``dul.time`` when a pass found nothing, and
    its outgoing queue is a plain ``queue.Queue`` made in ``__init__``: if either changes, this fails."""
    source = Path(dul.__file__).read_text(encoding="utf-8")
    loop_body = source.split("def run_reactor(self)", 1)[1].split("\n    def ", 1)[0]
    assert "time.sleep(self._run_loop_delay)" in loop_body
    assert "self._process_recv_primitive()" in loop_body and "self._is_transport_event()" in loop_body
    assert 'self.to_provider_queue: "_QueueType" = queue.Queue()' in source
    assert "\nimport time\n" in source


class _Transport:
    def __init__(self, sock: socket.socket | None) -> None:
        self.socket = sock


class _Dul:
    """What ``DulWakeup.wait`` reads of pynetdicom's DUL thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = _Transport(sock)
        self._kill_thread = False


def test_a_waiting_dul_thread_wakes_for_a_queued_primitive_or_a_received_pdu(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A wake-up given before the wait is not lost (the eventfd keeps it); bytes on the socket end the wait too;
    with neither, the wait runs out (and counts no wake-up)."""
    peer, ours = tcp_pair
    wakeup = wakeups.DulWakeup(ours)
    loop = _Dul(ours)
    wakeup.wake()
    wakeup.wait(loop, 0.001)
    assert wakeup.woken == 1
    wakeup.wait(loop, 0.001)  # the wake-up was consumed: this one runs out
    assert wakeup.woken == 1
    peer.sendall(b"\x04")
    wakeup.wait(loop, 0.001)
    assert (wakeup.woken, wakeup.polls) == (2, 3)
    wakeup.close()


def test_a_stopping_dul_thread_closes_its_eventfd_and_sleeps_plainly(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    _, ours = tcp_pair
    open_before = len(os.listdir("/proc/self/fd"))
    wakeup = wakeups.DulWakeup(ours)
    assert len(os.listdir("/proc/self/fd")) == open_before + 1
    loop = _Dul(ours)
    loop._kill_thread = True
    wakeup.wait(loop, 0.001)
    wakeup.wake()  # a late put on the queue writes nothing anywhere
    assert wakeup.polls == 0
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_an_idle_association_waits_and_its_eventfd_goes_with_it(listener: DicomListener) -> None:
    """The acceptor's DUL thread waits on its socket and its queue: half a second of silence costs it about ten
    waits (stock pynetdicom polls every millisecond: ~500), C-ECHOs end its waits, and once the association is
    released its eventfd is closed."""
    open_before = len(os.listdir("/proc/self/fd"))
    assoc, acceptor = verification_association(listener)
    wakeup = wakeups.dul_wakeup(acceptor)
    assert wakeup is not None
    assert isinstance(acceptor.dul.to_provider_queue, wakeups.WakingQueue)
    assert wakeups.dul_wakeup(assoc) is None  # our own SCU is left alone
    polls_before = wakeup.polls
    threading.Event().wait(0.5)
    assert wakeup.polls - polls_before <= 0.5 * 1000 / wakeups.DUL_LONGEST_WAIT_MS + 5
    woken_before = wakeup.woken
    for _ in range(REQUESTS):
        assert assoc.send_c_echo().Status == 0x0000
    assert wakeup.woken > woken_before  # its waits were ended by the requests and responses
    assoc.release()
    wait_for_associations_to_end(listener)
    acceptor.dul.join(5)
    assert wakeup.is_closed
    assert len(os.listdir("/proc/self/fd")) <= open_before
