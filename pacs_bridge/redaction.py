"""Secrets kept out of everything the bridge prints: the userinfo of URLs, and password-like query parameters.

A URL may carry credentials (``http://user:password@host/fhir``, ``postgresql://user:password@host/db``, a token
as ``https://TOKEN@host``, ``postgresql://user@host/db?password=…``). Log lines, error messages,
``check-config`` and ``status`` output show such a URL with its whole userinfo replaced by ``***``
(``http://***@host/fhir``) and the value of every password-like query parameter too (``?password=***``): the
host and path still say which server is meant. Every ``PacsBridgeError`` message goes through ``redact_urls``,
and so does every log event (``logs.redact_secrets``); what else is printed calls it where it is printed.

The rules lean to hiding: a password may hold white space, ``/`` and ``@`` (SQLAlchemy takes them as written),
so a userinfo runs to the last ``@`` on its line, and a secret parameter's value to the next ``&`` or ``#`` or
the end of the line. A URL followed on its line by another ``@`` (an e-mail address), or by more text after a
secret parameter, is printed with more hidden than its secret; a password is never shown, even in part.
"""

from __future__ import annotations

import re

HIDDEN = "***"

# Query parameters (and key=value connection settings) whose value is a secret: the names end in one of these.
SECRET_PARAMETER_NAMES = ("password", "passwd", "pass", "pwd", "secret", "token", "key")

# scheme://, then a user (no '/', '?', '#' or ':'), then optionally ':' and a password that runs to the last '@'
# on the line (it may hold white space, '/' and '@').
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#:\n]*(?::[^\n]*)?@")
# A URL-like string without '//' (``postgresql+psycopg:bridge:secret@db``, ``bridge:secret@db``): a word, ':',
# and whatever runs without white space or '/' to an '@'.
_BARE_USERINFO = re.compile(r"(?<![\w.+\-])[A-Za-z0-9_.+\-]+:[^\s/@]*@")
_SECRET_PARAMETER = re.compile(
    r"(?P<name>(?:(?<=[?&;\s])|^)[A-Za-z0-9_.\-]*(?:" + "|".join(SECRET_PARAMETER_NAMES) + r")=)[^&#\n]*",
    re.IGNORECASE,
)
_MAYBE_SECRET = re.compile("@|=")


def redact_urls(text: str) -> str:
    """``text`` with the userinfo (``user:password@``, ``user@``) of every URL in it replaced by ``***@``, and
    the value of every password-like parameter (``password=``, ``token=``, ``api_key=``, …) by ``***``."""
    if _MAYBE_SECRET.search(text) is None:  # the common case
        return text
    if "@" in text:
        text = _USERINFO.sub(rf"\g<scheme>{HIDDEN}@", text)
        text = _BARE_USERINFO.sub(f"{HIDDEN}@", text)
    if "=" in text:
        text = _SECRET_PARAMETER.sub(rf"\g<name>{HIDDEN}", text)
    return text


def redact_url(url: str) -> str:
    """``url`` as it may be printed: ``http://***@host/…`` when it carries a userinfo, secret parameters hidden.

    ``url`` is one value that should be a URL, valid or not: without ``://``, everything before its last ``@``
    is taken for a userinfo and hidden (``***@db/pacs``)."""
    if "://" not in url and "@" in url:
        url = f"{HIDDEN}@{url.rpartition('@')[2]}"
    return redact_urls(url)
