"""Several listener processes behind one DICOM port (``dicom.listener_processes`` above 1).

One process is bound by the GIL however many associations it serves. ``ListenerPool`` spreads associations
over N listener processes while the publisher, the scheduler, the HTTP health endpoints and sd_notify stay in
the main process:

- the main process owns the listening socket and accepts every connection itself (pausing, not spinning, when
  out of file descriptors: ``front_door.Acceptor``), then hands it at once (the file descriptor, over a Unix
  socket pair) to the listener process serving the fewest connections. Chosen over SO_REUSEPORT, where the
  kernel picks a process by a hash of the peer's port: four associations land all on one of two processes one
  time in eight, connections waiting in a stopped process's queue are reset, and nothing in the main process
  would know whether anyone accepts;
- each listener process (``python -m pacs_bridge.listener_processes``) runs the ordinary ``DicomListener`` with its
  own pynetdicom AE and its own database engine: its front door holds the connection until the association
  request is whole (the TLS handshake too, which has to happen in the process that serves the connection),
  and each association is served exactly as with one process (same handlers, same DIMSE status rules, success
  only after the commit). Several processes writing one SQLite file serialise on its write lock (``BEGIN
  IMMEDIATE`` with a busy timeout); PostgreSQL takes them concurrently;
- what a listener process observes for metrics (associations opened and closed, C-STORE results and bytes)
  goes back over the same socket pair to the main process's ``BridgeObserver``: one Prometheus registry, one
  ``/metrics``, no multiprocess files. C-STORE counts are summed in the listener process and sent twice a
  second, association events at once;
- SIGTERM (systemd sends it to every process of the unit) makes each listener process drain its associations
  (``dicom.shutdown_drain_seconds``) and exit 0; the main process stops accepting first, then waits for them.
  A listener process that exits on its own is a failure: the main process stops the bridge and exits non-zero
  so that systemd restarts it whole (``Restart=on-failure``), rather than run on with part of its capacity.

``max_associations`` and ``max_pending_connections`` are shared out: the listener processes' parts differ by at
most one and add up to the limit, and the main process hands each connection to the one with the most room left
in its part (a listener process reports each connection that ends, pending or associated), so the bridge as a
whole admits ``max_associations`` associations and rejects the next.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from pacs_bridge.config import Config
from pacs_bridge.dicom.acceptor import Acceptor
from pacs_bridge.dicom.listener_settings import ListenerSettings
from pacs_bridge.dicom.scp import DicomListener
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.group_commit import GroupCommit
from pacs_bridge.logs import configure_logging
from pacs_bridge.observe import BridgeObserver, NullObserver
from pacs_bridge.wiring import index_on, listener_settings, utc_now

log = structlog.get_logger("pacs_bridge.dicom")

_MESSAGE_BYTES = 65536  # one message on the socket pair, either way
_FLUSH_SECONDS = 0.5  # how often a listener process sends its C-STORE counts
_READY_TIMEOUT_SECONDS = 60.0
_ACCEPT_POLL_SECONDS = 0.2


def process_share(total: int, processes: int, slot: int) -> int:
    """Listener process ``slot``'s part of a limit of ``total`` shared out among ``processes``: the parts differ by
    at most one and add up to ``total`` (each is at least 1: ``dicom.listener_processes`` never exceeds
    ``max_associations``, so only a ``max_pending_connections`` below the number of processes rounds up)."""
    return max(1, total // processes + (1 if slot < total % processes else 0))


class _Worker:
    """The main process's view of one listener process."""

    def __init__(self, slot: int, process: subprocess.Popen[bytes], channel: socket.socket, capacity: int) -> None:
        self.slot = slot
        self.process = process
        self.channel = channel
        self.capacity = capacity  # its share of max_associations
        self.serving = 0  # connections handed over and not yet ended
        self.ready = threading.Event()
        self.reader: threading.Thread | None = None


class ListenerPool:
    """N listener processes behind one listening socket; the interface of ``DicomListener`` for ``service``."""

    def __init__(
        self,
        settings: ListenerSettings,
        *,
        processes: int,
        worker_config: str,
        observer: BridgeObserver,
        on_failure: Callable[[str], None],
        worker_command: Sequence[str] = (sys.executable, "-m", "pacs_bridge.listener_processes"),
    ) -> None:
        self._settings = settings
        self._processes = processes
        self._worker_config = worker_config  # the configuration as JSON, sent on each worker's stdin
        self._observer = observer
        self._on_failure = on_failure
        self._worker_command = tuple(worker_command)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._accepting = threading.Event()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._next = 0

    @property
    def is_accepting(self) -> bool:
        """Whether the listening socket accepts and every listener process is up."""
        return (
            self._accepting.is_set()
            and self._accept_thread is not None
            and self._accept_thread.is_alive()
            and all(w.ready.is_set() and w.process.poll() is None for w in self._workers)
        )

    @property
    def port(self) -> int:
        if self._socket is None:
            return self._settings.port
        return int(self._socket.getsockname()[1])

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._settings.bind else socket.AF_INET
        listening = socket.create_server((self._settings.bind, self._settings.port), family=family, backlog=1024)
        self._socket = listening
        try:
            for slot in range(self._processes):
                self._workers.append(self._spawn(slot))
            deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
            for worker in self._workers:
                while not worker.ready.wait(0.1):
                    if worker.process.poll() is not None or time.monotonic() > deadline:
                        raise OSError(
                            f"listener process {worker.slot} did not start (exit status {worker.process.poll()})"
                        )
        except BaseException:
            self._stopping.set()
            self._terminate_workers(timeout=5.0)
            listening.close()
            raise
        self._accepting.set()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="pacs-bridge-accept", daemon=True)
        self._accept_thread.start()
        log.info(
            "listener_started",
            ae_title=self._settings.ae_title,
            bind=self._settings.bind,
            port=self.port,
            tls=self._settings.tls is not None,
            listener_processes=self._processes,
            listener_pids=self.worker_pids,
        )

    def _spawn(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [*self._worker_command, "--slot", str(slot), "--channel-fd", str(theirs.fileno())],
                stdin=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(self._worker_config.encode("utf-8"))
        worker = _Worker(slot, process, ours, process_share(self._settings.max_associations, self._processes, slot))
        worker.reader = threading.Thread(
            target=self._read_worker, args=(worker,), name=f"pacs-bridge-listener-{slot}", daemon=True
        )
        worker.reader.start()
        return worker

    def _read_worker(self, worker: _Worker) -> None:
        """Apply what a listener process reports; its end of the socket pair closing means it has exited."""
        while True:
            try:
                message = worker.channel.recv(_MESSAGE_BYTES)
            except OSError:
                message = b""
            if not message:
                break
            try:
                self._apply(worker, json.loads(message))
            except Exception:  # a garbled report must not stop the reading; metrics are not worth a crash
                log.exception("listener_report_failed", listener_slot=worker.slot)
        status = worker.process.wait()
        if not self._stopping.is_set():
            reason = f"listener process {worker.slot} (pid {worker.process.pid}) exited with status {status}"
            log.error("listener_process_exited", listener_slot=worker.slot, pid=worker.process.pid, status=status)
            self._on_failure(reason)

    def _apply(self, worker: _Worker, report: dict[str, Any]) -> None:
        kind = report.get("kind")
        if kind == "ready":
            worker.ready.set()
        elif kind == "done":
            with self._lock:
                worker.serving -= 1
        elif kind == "opened":
            self._observer.association_opened()
        elif kind == "closed":
            self._observer.association_closed()
        elif kind == "refused":
            self._observer.association_refused(reason=str(report["reason"]))
        elif kind == "stored":
            for status, calling_ae, count, size_bytes in report["results"]:
                self._observer.instance_received(
                    status=status, calling_ae=calling_ae, size_bytes=size_bytes, count=count
                )

    def _accept_loop(self) -> None:
        listening = self._socket
        assert listening is not None
        listening.setblocking(False)
        acceptor = Acceptor(listening)
        with selectors.DefaultSelector() as selector:
            selector.register(listening, selectors.EVENT_READ)
            while self._accepting.is_set():
                if acceptor.resume_if_due(time.monotonic()):
                    selector.register(listening, selectors.EVENT_READ)
                if not selector.select(_ACCEPT_POLL_SECONDS):
                    continue
                for connection, address in acceptor.accept_some():
                    self._hand_over(connection, address)
                if acceptor.paused_until is not None:
                    selector.unregister(listening)

    def _hand_over(self, connection: socket.socket, address: Any) -> None:
        with connection:
            with self._lock:
                # The listener process with the most room left in its share of max_associations; ties go round
                # the pool. When every share is taken, the one it goes to rejects it (Local Limit Exceeded).
                order = self._workers[self._next :] + self._workers[: self._next]
                worker = min(order, key=lambda w: w.serving - w.capacity)
                self._next = (self._next + 1) % len(self._workers)
                worker.serving += 1
            try:
                socket.send_fds(worker.channel, [json.dumps(list(address[:2])).encode()], [connection.fileno()])
            except OSError as exc:  # that process is gone; its reader reports it
                with self._lock:
                    worker.serving -= 1
                log.error("handover_failed", listener_slot=worker.slot, error=str(exc))
        # Our copy is closed here; the listener process holds its own.

    def stop(self, *, drain_timeout_seconds: float = 30.0) -> None:
        """Stop accepting, then let every listener process drain its associations (up to the timeout) and exit."""
        if self._socket is None:
            return
        self._stopping.set()
        self._accepting.clear()
        if self._accept_thread is not None:
            self._accept_thread.join()
        self._socket.close()
        statuses = self._terminate_workers(timeout=drain_timeout_seconds + 15.0)
        self._socket = None
        log.info("listener_stopped", listener_exit_statuses=statuses)

    def _terminate_workers(self, *, timeout: float) -> list[int | None]:
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        statuses: list[int | None] = []
        for worker in self._workers:
            try:
                statuses.append(worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                log.error("listener_process_killed", listener_slot=worker.slot, pid=worker.process.pid)
                worker.process.kill()
                statuses.append(worker.process.wait())
            if worker.reader is not None:
                worker.reader.join(timeout=5.0)
            worker.channel.close()
        return statuses


class ChannelObserver(NullObserver):
    """A listener process's ``BridgeObserver``: reports to the main process over the socket pair (a listener
    process does not publish, so the publishing events stay the null observer's)."""

    def __init__(self, channel: socket.socket) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._results: dict[tuple[int, str], list[int]] = {}  # (status, calling AE) -> [count, bytes]

    def send(self, report: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the main process is gone; the listener process stops anyway
            self._channel.send(json.dumps(report).encode("utf-8"))

    def association_opened(self) -> None:
        self.send({"kind": "opened"})

    def association_closed(self) -> None:
        self.send({"kind": "closed"})

    def association_refused(self, *, reason: str) -> None:
        self.send({"kind": "refused", "reason": reason})

    def instance_received(self, *, status: int, calling_ae: str, size_bytes: int, count: int = 1) -> None:
        with self._lock:
            entry = self._results.setdefault((status, calling_ae), [0, 0])
            entry[0] += count
            entry[1] += size_bytes

    def flush(self) -> None:
        with self._lock:
            results, self._results = self._results, {}
        if results:
            rows = [[status, ae, count, size] for (status, ae), (count, size) in results.items()]
            self.send({"kind": "stored", "results": rows})


def _add_listener_fields(slot: int) -> Callable[[Any, str, Any], Any]:
    pid = os.getpid()

    def add(_logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict.setdefault("listener_slot", slot)
        event_dict.setdefault("pid", pid)
        return event_dict

    return add


def run_worker(slot: int, channel: socket.socket, config_json: str) -> int:
    """A listener process: serve the connections the main process hands over until SIGTERM (or until the
    main process is gone), then drain and return 0."""
    config = Config.model_validate_json(config_json)
    configure_logging(config.logging.level, config.logging.format)
    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[processors[0], _add_listener_fields(slot), *processors[1:]])

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())  # from the main process, which stops us
    # Ctrl-C in a terminal reaches the whole process group: the main process alone acts on it and stops the
    # listener processes in order, so none exits first and makes a clean stop look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    settings = listener_settings(config)
    processes = config.dicom.listener_process_count
    settings = dataclasses.replace(
        settings,
        max_associations=process_share(settings.max_associations, processes, slot),
        max_pending_connections=process_share(settings.max_pending_connections, processes, slot),
    )
    engine = make_engine(config.database.url)  # the main process has prepared the schema
    observer = ChannelObserver(channel)
    listener = DicomListener(settings, GroupCommit(index_on(engine, config)), clock=utc_now, observer=observer)
    listener.start(listen=False, on_connection_closed=lambda: observer.send({"kind": "done"}))

    def flush_regularly() -> None:
        while not stop.wait(_FLUSH_SECONDS):
            observer.flush()

    flusher = threading.Thread(target=flush_regularly, name="pacs-bridge-report", daemon=True)
    flusher.start()
    observer.send({"kind": "ready", "pid": os.getpid()})
    log.info("listener_process_started", listener_slot=slot)
    with selectors.DefaultSelector() as selector:
        selector.register(channel, selectors.EVENT_READ)
        while not stop.is_set():
            if not selector.select(_ACCEPT_POLL_SECONDS):
                continue
            try:
                message, fds, _flags, _address = socket.recv_fds(channel, _MESSAGE_BYTES, 1)
            except InterruptedError:
                continue
            if not message and not fds:
                log.warning("main_process_gone")
                break
            for fd in fds:
                connection = socket.socket(fileno=fd)
                connection.setblocking(True)  # as socket.accept() hands it to pynetdicom
                host, port = json.loads(message)
                try:
                    listener.adopt(connection, (str(host), int(port)))
                except Exception:
                    log.exception("adopt_failed")
    listener.stop(drain_timeout_seconds=config.dicom.shutdown_drain_seconds)
    stop.set()
    flusher.join()
    observer.flush()
    engine.dispose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pacs-bridge listener process (started by `pacs-bridge run`)")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.channel_fd)
    return run_worker(args.slot, channel, sys.stdin.read())


if __name__ == "__main__":
    sys.exit(main())
