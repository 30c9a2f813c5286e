"""What every section of the configuration shares: its strictness (unknown keys refused), paths relative to
the file's directory, and the checks of AE titles, URLs, readable files and secret keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo

from pacs_bridge.redaction import redact_url

_AE_TITLE = re.compile(r"[\x20-\x5B\x5D-\x7E]{1,16}")  # PS3.5 AE VR: no backslash, no control characters
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL, got {redact_url(value)!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Validation context key: the directory of the configuration file, against which relative paths resolve. Absent
# (a document validated without a file, or a listener process re-reading its parent's resolved settings):
# relative paths stay as written.
_CONFIG_DIRECTORY = "config_directory"


def _config_directory(info: ValidationInfo) -> Path | None:
    context = info.context
    directory = context.get(_CONFIG_DIRECTORY) if isinstance(context, dict) else None
    return directory if isinstance(directory, Path) else None


def _against_config_directory(value: Any, info: ValidationInfo) -> Any:
    """A relative file path made absolute against the configuration file's directory (empty stays empty)."""
    directory = _config_directory(info)
    if not isinstance(value, str) or not value or directory is None or Path(value).is_absolute():
        return value
    return str(directory / value)


# A file named in the configuration: a relative path is relative to the configuration file's directory.
ConfigFilePath = Annotated[str, BeforeValidator(_against_config_directory)]

_SQLITE_URL = re.compile(r"(?P<scheme>sqlite(?:\+\w+)?):///(?P<path>[^?]*)(?P<query>\?.*)?", re.DOTALL)


def sqlite_url_against(url: str, directory: Path) -> str:
    """``url`` with a relative SQLite file path made absolute against ``directory``; any other URL (PostgreSQL,
    an absolute path, an in-memory or ``file:`` URI database) unchanged."""
    match = _SQLITE_URL.fullmatch(url)
    if match is None:
        return url
    path = match["path"]
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).is_absolute():
        return url
    return f"{match['scheme']}:///{directory / path}{match['query'] or ''}"


def _checked_ae_title(value: str) -> str:
    if not _AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(f"expected 1 to 16 printable characters without backslash, got {value!r}")
    return value.strip()


def _readable_file(value: str) -> str:
    if value and not Path(value).is_file():
        raise ValueError(f"no readable file at {value!r}")
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# fhir.auth keys that would hold a secret in the file itself: refused, naming the _env/_file keys to use.
_INLINE_SECRET_KEYS = {
    "token": ("token_env", "token_file"),
    "password": ("password_env", "password_file"),
    "client_secret": ("client_secret_env", "client_secret_file"),
    "private_key": ("private_key_file",),
}
# The fhir.auth keys each mode needs (a tuple: exactly one of them) and may use.
_AUTH_REQUIRED: dict[str, tuple[str | tuple[str, str], ...]] = {
    "none": (),
    "bearer": (("token_env", "token_file"),),
    "basic": ("username", ("password_env", "password_file")),
    "oauth2_client_credentials": ("token_url", "client_id", ("client_secret_env", "client_secret_file")),
    "smart_backend_services": ("token_url", "client_id", "private_key_file", "scope"),
}
_AUTH_OPTIONAL: dict[str, tuple[str, ...]] = {
    "oauth2_client_credentials": ("scope", "client_auth_method"),
    "smart_backend_services": ("algorithm", "kid"),
}


def _auth_key_problems(section: BaseModel, mode: str) -> list[str]:
    """What is wrong with an auth section's keys for its ``mode`` (``fhir.auth``, ``pacs.auth``): a key the mode
    needs that is missing (of a pair, not exactly one given), or a key set to something the mode does not use."""
    required = _AUTH_REQUIRED[mode]
    problems = []
    for need in required:
        if isinstance(need, tuple):
            if len([key for key in need if getattr(section, key)]) != 1:
                problems.append(f"mode {mode} needs exactly one of {' or '.join(need)}")
        elif not getattr(section, need):
            problems.append(f"mode {mode} needs {need}")
    usable = {"mode", *_AUTH_OPTIONAL.get(mode, ())}
    usable.update(key for need in required for key in (need if isinstance(need, tuple) else (need,)))
    for key in sorted(section.model_fields_set - usable):
        if getattr(section, key) != type(section).model_fields[key].default:
            problems.append(f"{key} is not used with mode {mode}; remove it or change the mode")
    return problems
