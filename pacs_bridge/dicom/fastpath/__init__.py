"""The fast path: every change the bridge makes inside pynetdicom to receive faster, in one package, behind one
switch (the other reach into pynetdicom, dicom/message_screen.py, answers the messages the bridge does not serve).

Stock pynetdicom serves each C-STORE through its DIMSE message machinery, on two threads that poll every
millisecond, and copies the listener's presentation contexts for every association. The pieces below change
that for pynetdicom 3.0 only, by reaching into its internals; each was measured on and off
(docs/performance.md, "The fast path, piece by piece") and is kept because it pays:

- ``wakeups`` (wakeups.py): each association's own thread and its DUL thread wait for work instead of polling;
- ``inline_store`` (inline_store.py): C-STOREs served on the DUL thread that read them, each P-DATA-TF read
  whole, the command set read with ``struct``, a plain response encoded in one step and written at once;
- ``shared_contexts`` (shared_contexts.py): associations share the listener's contexts instead of copying them.

``enable`` checks the installed pynetdicom's version against ``SUPPORTED_VERSIONS``, patches pynetdicom with
the pieces (process-wide patches that change nothing for an association ``FastPath.prepare`` did not prepare)
and runs a self-check (self_check.py): one real association over loopback through the listener's guarded
socket, whose C-ECHO must wake its association thread, whose C-STORE must be served inline and answered
Success, with a plain response encoded as the bytes pynetdicom would send. An unsupported version, a piece that
does not import or a failed check removes every patch and returns ``FastPathUnavailable`` with the reason: the
listener then runs stock pynetdicom (``dicom.fast_path: off`` does the same on purpose). The result is kept for
the process.

The listener calls ``FastPath`` from three of its pynetdicom event handlers: ``prepare`` when a connection
opens (EVT_CONN_OPEN), ``let_in`` once the access check has let the peer in (EVT_ESTABLISHED), and
``connection_closed`` (EVT_CONN_CLOSE).
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("pacs_bridge.dicom")

SUPPORTED_VERSIONS = ("3.0",)  # pynetdicom major.minor releases the pieces are written and tested against
PIECES = ("wakeups", "inline_store", "shared_contexts")

_lock = threading.Lock()
_results: dict[tuple[frozenset[str], str], FastPath | FastPathUnavailable] = {}


@dataclass(frozen=True, slots=True)
class FastPathUnavailable:
    """Stock pynetdicom serves the listener, for ``reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class FastPath:
    """The pieces pynetdicom is patched with and the self-check passed; the listener calls these from its
    pynetdicom event handlers."""

    pieces: frozenset[str]

    def contexts(self, supported: list[Any]) -> list[Any]:
        """The supported presentation contexts to give pynetdicom's server."""
        if "shared_contexts" not in self.pieces:
            return supported
        from pacs_bridge.dicom.fastpath.shared_contexts import SharedContexts

        return SharedContexts(supported)

    def prepare(self, assoc: Any) -> None:
        """EVT_CONN_OPEN: prepare ``assoc`` before anything of it is read."""
        from pacs_bridge.dicom.fastpath import inline_store, wakeups

        if "wakeups" in self.pieces:
            wakeups.prepare(assoc)
        if "inline_store" in self.pieces:
            inline_store.prepare(assoc)

    def let_in(self, assoc: Any) -> None:
        """EVT_ESTABLISHED, once the listener has let ``assoc`` in: its C-STOREs may be served inline."""
        if "inline_store" in self.pieces:
            from pacs_bridge.dicom.fastpath import inline_store

            inline_store.let_in(assoc)

    def connection_closed(self, assoc: Any) -> None:
        """EVT_CONN_CLOSE: release what ``prepare`` opened, and what a request cut off mid-data-set holds."""
        from pacs_bridge.dicom.fastpath import inline_store, wakeups

        if "wakeups" in self.pieces:
            wakeups.connection_closed(assoc)
        if "inline_store" in self.pieces:
            inline_store.connection_closed(assoc)


def pynetdicom_version() -> str:
    import pynetdicom

    return str(pynetdicom.__version__)


def is_supported(version: str) -> bool:
    """Whether the pieces apply to pynetdicom ``version`` (e.g. ``3.0.4``)."""
    return ".".join(version.split(".")[:2]) in SUPPORTED_VERSIONS


def enable(pieces: Collection[str] | None = None, *, version: str | None = None) -> FastPath | FastPathUnavailable:
    """Patch pynetdicom with ``pieces`` (by default ``PIECES``) and check them, once per process; see the
    module docstring. ``version``: the pynetdicom release to judge (by default the one installed)."""
    wanted = frozenset(PIECES if pieces is None else pieces)
    unknown = wanted - set(PIECES)
    if unknown:
        raise ValueError(f"unknown fast path pieces {sorted(unknown)}; the pieces are {list(PIECES)}")
    version = version or pynetdicom_version()
    with _lock:
        if (wanted, version) not in _results:
            _results[wanted, version] = _enable(wanted, version)
        return _results[wanted, version]


def _enable(pieces: frozenset[str], version: str) -> FastPath | FastPathUnavailable:
    if not is_supported(version):
        return FastPathUnavailable(
            f"pynetdicom {version} is not a release the fast path supports ({', '.join(SUPPORTED_VERSIONS)}.x)"
        )
    try:
        from pacs_bridge.dicom.fastpath import inline_store, wakeups
        from pacs_bridge.dicom.fastpath.self_check import run_self_check

        if "wakeups" in pieces:
            wakeups.patch()
        if "inline_store" in pieces:
            inline_store.patch()
        fast = FastPath(pieces)
        problem = run_self_check(fast)
    except Exception as exc:  # a piece that no longer fits this pynetdicom: stock pynetdicom instead
        log.exception("fast_path_self_check_failed")
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return fast
    _unpatch()
    return FastPathUnavailable(f"self-check failed: {problem}")


def _unpatch() -> None:
    try:
        from pacs_bridge.dicom.fastpath import inline_store, wakeups
    except Exception:  # nothing was patched then
        return
    wakeups.unpatch()
    inline_store.unpatch()
