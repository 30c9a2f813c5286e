"""The answer to every DIMSE message the bridge does not serve: its response with 0x0211, or nothing; never a
traceback, never the C-STORE handler.

The listener serves two requests: C-STORE (storage SOP classes) and C-ECHO (Verification). pynetdicom 3.0 picks
the service for a received message by the SOP class UID the message names, in the private
``Association._serve_request``, and runs it whatever the message is: an N-ACTION, N-SET, N-GET, N-CREATE,
N-DELETE or N-EVENT-REPORT naming CT Image Storage reaches the Storage SCP, which calls the C-STORE handler with
it and answers a C-STORE-RSP (0x0110); a C-FIND, C-GET, C-MOVE or C-ECHO naming a storage SOP class raises in the
Storage SCP, and one naming a Query/Retrieve SOP class on a storage context raises in the Query/Retrieve SCP:
pynetdicom logs the traceback and aborts. pynetdicom's public API cannot change this: an intervention handler
(EVT_N_ACTION, EVT_C_FIND, ...) is called only after a service is picked, and EVT_DIMSE_RECV only observes.

``MessageScreen.install`` (at EVT_CONN_OPEN, before anything is read) therefore puts ``screen`` in front of
``_serve_request`` on each association (an instance attribute shadowing the method: every received message passes
through it, on the association's thread, or on the thread pynetdicom starts for an N-EVENT-REPORT request):

- a C-STORE request, and a C-ECHO request naming Verification: pynetdicom's, as before; but a C-STORE request
  on a storage context naming a SOP class pynetdicom has no Storage SCP for (a bare "31", an unknown UID,
  Verification's), which pynetdicom would abort the association for, goes to the Storage SCP all the same: the
  C-STORE handler answers it 0xA900 (not the context's SOP class) and the association goes on, as on the fast
  path;
- any other request (C-ECHO naming another SOP class, C-FIND, C-GET, C-MOVE and every DIMSE-N request): its
  response, status 0x0211 "Unrecognized operation" (PS3.7 annex C: the operation is not one the bridge agreed to
  on that presentation context), naming the request's SOP class (and instance, for DIMSE-N); the association
  goes on;
- a response (the bridge sends no requests, so every response is stray) and a C-CANCEL: ignored. Nothing answers
  a response, and a C-CANCEL has no response (PS3.7 9.3.2.3); there is nothing to cancel, as a C-STORE cannot be
  cancelled and the bridge answers each before the next. pynetdicom keeps up to ten C-CANCELs aside
  (``dimse.cancel_req``) rather than passing them on, so those are logged when the next message is screened or
  when the association ends (``association_ended``).

Each message refused or ignored is logged once, as a warning (``dimse_message_refused``,
``dimse_message_ignored``) naming the peer, the message and the SOP classes; none reaches the C-STORE handler, so
none is indexed. A message on a presentation context that was not accepted, or received during release, is left
to pynetdicom (A-ABORT; ignored).

This reaches into pynetdicom's internals: ``enable`` checks the installed release against ``SUPPORTED_VERSIONS``
and runs ``self_check`` (an association object without a connection, screened, must answer an N-ACTION with an
N-ACTION response of 0x0211 and pass a C-STORE on); otherwise, or with ``dicom.message_screen: off``, pynetdicom
dispatches every message itself (``MessageScreenUnavailable``). Both receive paths (``dicom.fast_path``) pass
every message but the C-STOREs the fast path serves inline to ``_serve_request``, so the screen serves both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_STORE, N_ACTION
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = structlog.get_logger("pacs_bridge.dicom")

SUPPORTED_VERSIONS = ("3.0",)  # pynetdicom major.minor releases whose _serve_request the screen is written for
UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 annex C
VERIFICATION = "1.2.840.10008.1.1"
_SCREENED = "_pacs_bridge_screened"
_QUOTED_CHARS = 64  # a UID is at most 64 characters; a peer's longer value is cut in the log
_NOTHING_TO_CANCEL = "nothing to cancel: a C-STORE cannot be cancelled, and each is answered before the next"


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the request with ``response`` (its response primitive, status 0x0211)."""

    response: Any


@dataclass(frozen=True, slots=True)
class Ignore:
    """Send nothing: a response, or a C-CANCEL."""


@dataclass(frozen=True, slots=True)
class ServeAsStorage:
    """A C-STORE request on a storage context whose SOP class pynetdicom serves with no Storage SCP: serve it with
    the Storage SCP (the handler answers 0xA900) instead of pynetdicom's abort."""


def message_name(message: Any) -> str:
    """The message as PS3.7 names it, e.g. ``N-ACTION-RQ`` or ``C-STORE-RSP``."""
    service = type(message).__name__.replace("_", "-")
    if isinstance(message, C_CANCEL):
        return f"{service}-RQ"
    return f"{service}-RQ" if getattr(message, "MessageID", None) is not None else f"{service}-RSP"


def _sop_class(message: Any) -> str:
    value = getattr(message, "AffectedSOPClassUID", None) or getattr(message, "RequestedSOPClassUID", None)
    return str(value or "")


def _sop_instance(message: Any) -> str:
    value = getattr(message, "AffectedSOPInstanceUID", None) or getattr(message, "RequestedSOPInstanceUID", None)
    return str(value or "")


def verdict(message: Any, *, context_sop_class: str = "") -> Refuse | Ignore | ServeAsStorage | None:
    """What the bridge does with a DIMSE message received on a context negotiated for ``context_sop_class``: None
    to let pynetdicom serve it (a C-STORE request, a C-ECHO request naming Verification), ``ServeAsStorage`` for
    a C-STORE request pynetdicom would abort for, ``Refuse`` with the response to send, or ``Ignore``."""
    if isinstance(message, C_CANCEL) or getattr(message, "MessageID", None) is None:
        return Ignore()
    if isinstance(message, C_STORE):
        names_storage = is_storage_sop_class(_sop_class(message))
        return ServeAsStorage() if not names_storage and is_storage_sop_class(context_sop_class) else None
    if isinstance(message, C_ECHO) and str(message.AffectedSOPClassUID or "") == VERIFICATION:
        return None
    return Refuse(refusal(message))


def is_storage_sop_class(uid: str) -> bool:
    """Whether pynetdicom serves C-STOREs naming ``uid`` with its Storage SCP (as it picks the service: by UID)."""
    service_class = uid_to_service_class(uid)
    return isinstance(service_class, type) and service_class.SCP is StorageServiceClass.SCP


def refusal(request: Any) -> Any:
    """``request``'s response primitive with status 0x0211, naming the request's SOP class (and instance) where it
    names a valid one."""
    response = type(request)()
    response.MessageIDBeingRespondedTo = request.MessageID
    response.Status = UNRECOGNIZED_OPERATION
    named = (("AffectedSOPClassUID", _sop_class(request)), ("AffectedSOPInstanceUID", _sop_instance(request)))
    for field, value in named:
        if value and hasattr(response, field):
            # a UID pynetdicom refuses to encode: the response goes without it
            with contextlib.suppress(TypeError, ValueError):
                setattr(response, field, value)
    return response


def _peer(assoc: Any) -> dict[str, str]:
    requestor = assoc.requestor
    where = requestor.address_info
    peer = f"{where.address}:{where.port}" if where is not None else ""
    return {"calling_ae": str(requestor.ae_title or "").strip(), "peer": peer}


Warn = Callable[..., Any]  # log.warning, or a check's silence


def _log_cancels(assoc: Any, warn: Warn) -> None:
    """Log the C-CANCELs pynetdicom kept aside since the last message it served, and forget them (as it would)."""
    cancels = assoc.dimse.cancel_req
    if not cancels:
        return
    assoc.dimse.cancel_req = {}
    warn(
        "dimse_message_ignored",
        **_peer(assoc),
        message="C-CANCEL-RQ",
        count=len(cancels),
        reason=_NOTHING_TO_CANCEL,
    )


def screen(assoc: Any, stock: Callable[[Any, int], None], message: Any, context_id: int, warn: Warn) -> None:
    """Stands in for ``assoc._serve_request(message, context_id)``: see the module docstring."""
    try:
        _log_cancels(assoc, warn)
        context = assoc._accepted_cx.get(context_id)
        # Not accepted: pynetdicom aborts; during release: it ignores the message. A SOP class negotiated by
        # extended negotiation, or pynetdicom's unrestricted storage, picks a service of its own: left to it.
        left_to_pynetdicom = (
            context is None
            or assoc._sent_release
            or pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE
            or _sop_class(message) in assoc.acceptor.accepted_common_extended
        )
        answer = None if left_to_pynetdicom else verdict(message, context_sop_class=str(context.abstract_syntax))
        if isinstance(answer, ServeAsStorage):
            _serve_as_storage(assoc, message, context)
            return
        if answer is not None:
            _answer(assoc, message, context_id, context, answer, warn)
            return
    except Exception:  # a fault of the screen's own: end the association as pynetdicom would, never its thread
        log.exception("message_screen_failed", message=type(message).__name__)
        assoc.abort()
        return
    stock(message, context_id)


def _serve_as_storage(assoc: Any, request: Any, context: Any) -> None:
    """Serve ``request`` with pynetdicom's Storage SCP as ``_serve_request`` serves a request it picked a service
    for: C-CANCELs kept aside are dropped before and after, and the association is paused meanwhile."""
    assoc.dimse.cancel_req = {}
    assoc._is_paused = True
    StorageServiceClass(assoc).SCP(request, context)
    assoc._is_paused = False
    assoc.dimse.cancel_req = {}


def _answer(assoc: Any, message: Any, context_id: int, context: Any, answer: Refuse | Ignore, warn: Warn) -> None:
    fields = {
        **_peer(assoc),
        "message": message_name(message),
        "sop_class_uid": _sop_class(message)[:_QUOTED_CHARS],
        "context_sop_class_uid": str(context.abstract_syntax),
    }
    if isinstance(answer, Ignore):
        reason = _NOTHING_TO_CANCEL if isinstance(message, C_CANCEL) else "a response: the bridge sends no requests"
        warn("dimse_message_ignored", **fields, reason=reason)
        return
    warn("dimse_message_refused", **fields, status=f"0x{UNRECOGNIZED_OPERATION:04X}")
    assoc.dimse.send_msg(answer.response, context_id)


@dataclass(frozen=True, slots=True)
class MessageScreen:
    """The screen is on: the listener calls these from its pynetdicom event handlers."""

    def install(self, assoc: Any, *, warn: Warn | None = None) -> None:
        """EVT_CONN_OPEN: screen every message ``assoc`` receives; ``warn`` logs what was refused or ignored (by
        default a warning in the bridge's log)."""
        if getattr(assoc, _SCREENED, False):
            return
        stock, report = assoc._serve_request, warn or log.warning
        assoc._serve_request = lambda message, context_id: screen(assoc, stock, message, context_id, report)
        setattr(assoc, _SCREENED, True)

    def association_ended(self, assoc: Any) -> None:
        """EVT_RELEASED, EVT_ABORTED: log the C-CANCELs still kept aside."""
        if getattr(assoc, _SCREENED, False):
            _log_cancels(assoc, log.warning)

    def log_fields(self) -> dict[str, str]:
        return {"message_screen": "on"}


@dataclass(frozen=True, slots=True)
class MessageScreenUnavailable:
    """pynetdicom dispatches every message itself, for ``reason``."""

    reason: str

    def install(self, assoc: Any) -> None:
        pass

    def association_ended(self, assoc: Any) -> None:
        pass

    def log_fields(self) -> dict[str, str]:
        return {"message_screen": "off", "message_screen_reason": self.reason}


def is_supported(version: str) -> bool:
    """Whether the screen applies to pynetdicom ``version`` (e.g. ``3.0.4``)."""
    return ".".join(version.split(".")[:2]) in SUPPORTED_VERSIONS


Screen = MessageScreen | MessageScreenUnavailable


def enable(*, wanted: bool = True, version: str | None = None) -> Screen:
    """The screen, when ``wanted`` (``dicom.message_screen: auto``), pynetdicom ``version`` (by default the
    installed one) is supported and the self-check passes; else why not."""
    if not wanted:
        return MessageScreenUnavailable("dicom.message_screen is off")
    if version is None:
        import pynetdicom

        version = str(pynetdicom.__version__)
    if not is_supported(version):
        return MessageScreenUnavailable(
            f"pynetdicom {version} is not a release the message screen supports ({', '.join(SUPPORTED_VERSIONS)}.x)"
        )
    try:
        problem = self_check()
    except Exception as exc:  # the internals no longer look as the screen expects
        log.exception("message_screen_self_check_failed")
        problem = f"{type(exc).__name__}: {exc}"
    return MessageScreen() if problem is None else MessageScreenUnavailable(f"self-check failed: {problem}")


def self_check() -> str | None:
    """Screen an acceptor association object that has no connection; None when it answers an N-ACTION request
    with an N-ACTION response of 0x0211 and passes a C-STORE request on to pynetdicom, else what went wrong."""
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    assoc: Any = Association(AE(), "acceptor")
    for name in ("_serve_request", "_accepted_cx", "_sent_release", "_is_paused"):
        if not hasattr(assoc, name):
            return f"pynetdicom's Association has no {name}"
    if not isinstance(assoc.dimse.cancel_req, dict):
        return "pynetdicom's DIMSE provider keeps no cancel_req dict"
    if not isinstance(assoc.acceptor.accepted_common_extended, dict):
        return "pynetdicom's acceptor keeps no accepted_common_extended dict"
    if not is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2") or is_storage_sop_class("31"):
        return "pynetdicom no longer picks its Storage SCP by SOP class as the screen expects"
    context = PresentationContext()
    context.context_id = 1
    context.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
    context.transfer_syntax = ["1.2.840.10008.1.2"]
    assoc._accepted_cx = {1: context}
    served: list[Any] = []
    sent: list[Any] = []
    assoc._serve_request = lambda message, context_id: served.append(message)
    assoc.dimse.send_msg = lambda primitive, context_id: sent.append(primitive)
    MessageScreen().install(assoc, warn=lambda *args, **fields: None)
    action = N_ACTION()
    action.MessageID, action.ActionTypeID = 1, 1
    action.RequestedSOPClassUID, action.RequestedSOPInstanceUID = context.abstract_syntax, "1.2.3"
    store = C_STORE()
    store.MessageID, store.Priority = 2, 2
    store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = context.abstract_syntax, "1.2.3"
    assoc._serve_request(action, 1)
    assoc._serve_request(store, 1)
    if len(sent) != 1 or not isinstance(sent[0], N_ACTION) or sent[0].Status != UNRECOGNIZED_OPERATION:
        return f"an N-ACTION request was answered {sent!r}"
    if served != [store]:
        return f"pynetdicom was given {served!r} instead of the C-STORE request"
    return None
