"""Logging: structlog for our events, with the stdlib loggers of pynetdicom, httpx, SQLAlchemy and
APScheduler routed through the same pipeline.

Off a TTY (systemd/journald) every line is one JSON object on stdout; on a TTY, readable key=value lines.
Patient data never leaves through the logs: ``drop_patient_data`` removes such keys from every event, and
``redact_secrets`` hides the password of any URL in any of its values (``pacs_bridge.redaction``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from pacs_bridge.redaction import redact_urls

LogFormat = Literal["auto", "json", "console"]

# Keys that would carry protected health information; UIDs identify the work instead.
PATIENT_DATA_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date", "birth_date", "patient_sex"})

# Library loggers that are chatty at INFO (pynetdicom logs every PDU summary, httpx every request,
# APScheduler every tick): they speak from WARNING unless we run at debug level.
_QUIET_LIBRARIES = ("pynetdicom", "httpx", "httpcore", "apscheduler", "sqlalchemy", "alembic")


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
    # pynetdicom installs its own handler on import; one pipeline means no second copy of its lines.
    logging.getLogger("pynetdicom").handlers[:] = []
    logging.getLogger("pynetdicom").propagate = True
