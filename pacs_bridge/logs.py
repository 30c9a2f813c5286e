"""Logging: structlog for our events, with the stdlib loggers of pynetdicom, httpx, SQLAlchemy and
APScheduler routed through the same pipeline, and so are exceptions that end a thread (``threading.excepthook``).

Off a TTY (systemd/journald) every line is one JSON object on stdout; on a TTY, readable key=value lines.
Patient data never leaves through the logs: ``drop_patient_data`` removes such keys from every event, and
``redact_secrets`` hides the password of any URL in any of its values (``pacs_bridge.redaction``).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, Literal

import structlog

from pacs_bridge.redaction import redact_urls

LogFormat = Literal["auto", "json", "console"]

# Keys that would carry protected health information; UIDs identify the work instead.
PATIENT_DATA_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date", "birth_date", "patient_sex"})

# Library loggers that are chatty at INFO (pynetdicom logs every PDU summary, httpx every request,
# APScheduler every tick): they speak from WARNING unless we run at debug level.
_QUIET_LIBRARIES = ("pynetdicom", "httpx", "httpcore", "apscheduler", "sqlalchemy", "alembic")
# pynetdicom.presentation warns once per UID of a request it does not know as a transfer syntax: a peer could
# make one A-ASSOCIATE-RQ write thousands of lines. The front door logs one line per request instead
# (``unknown_transfer_syntaxes_proposed``, dicom/front_door.py).
_PER_UID_LOGGERS = ("pynetdicom.presentation",)
_QUOTED_ERROR_CHARS = 200

log = structlog.get_logger("pacs_bridge")


def drop_patient_data(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: remove keys that would carry patient data."""
    for key in PATIENT_DATA_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the userinfo of every URL in a string value (the event included) replaced by ***, so
    neither our events nor a library's lines (httpx, SQLAlchemy) print a password given in a URL."""
    for key, value in event_dict.items():
        if type(value) is str:
            event_dict[key] = redact_urls(value)
    return event_dict


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _raised_by_pynetdicom(traceback: TracebackType | None) -> bool:
    """Whether the exception went through pynetdicom's code and was not raised by the bridge's own."""
    modules = []
    while traceback is not None:
        modules.append(str(traceback.tb_frame.f_globals.get("__name__", "")))
        traceback = traceback.tb_next
    return (
        bool(modules)
        and any(_in_package(module, "pynetdicom") for module in modules)
        and not _in_package(modules[-1], "pacs_bridge")
    )


def log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: an exception that ends a thread, as one log event instead of a plain-text
    traceback on stderr.

    One raised in pynetdicom (or in what it called, pydicom decoding a command set), not in the bridge's code,
    ends the thread serving one association on what its peer sent (an event its state machine does not allow,
    a request it cannot decode): a warning naming the error, without a traceback. Anything else is a defect of
    the bridge's: an error with its traceback."""
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else ""
    if _raised_by_pynetdicom(args.exc_traceback):
        error = f"{args.exc_type.__name__}: {args.exc_value}"
        if len(error) > _QUOTED_ERROR_CHARS:
            error = error[:_QUOTED_ERROR_CHARS] + "..."
        log.warning("association_thread_failed", thread=thread, error=error)
        return
    log.error("thread_failed", thread=thread, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_patient_data,
    ]


def configure_logging(level: str = "info", log_format: LogFormat = "auto") -> None:
    """Configure structlog and the stdlib root logger to write to stdout."""
    numeric_level = logging.getLevelName(level.upper())
    use_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared = _shared_processors()
    structlog.configure(
        # filter_by_level first: a debug event (one per stored instance) costs nothing at info level.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,  # after format_exc_info: a traceback may quote a URL too
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    library_level = numeric_level if numeric_level <= logging.DEBUG else logging.WARNING
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    # SQLAlchemy's engine prints every result row at DEBUG, patient names and IDs among them: at debug level it
    # shows statements only (INFO), their parameters hidden by the engine itself (index/engine.py).
    logging.getLogger("sqlalchemy.engine").setLevel(max(library_level, logging.INFO))
    for name in _PER_UID_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # pynetdicom installs its own handler on import; one pipeline means no second copy of its lines.
    logging.getLogger("pynetdicom").handlers[:] = []
    logging.getLogger("pynetdicom").propagate = True
    # Unless something else (a test runner, a debugger) has installed a hook of its own.
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = log_thread_exception
