"""Secrets kept out of everything the bridge prints: the userinfo of URLs.

A URL may carry credentials (``http://user:password@host/fhir``, ``postgresql://user:password@host/db``, a token
as ``https://TOKEN@host``). Log lines, error messages, ``check-config`` and ``status`` output show such a URL with
its whole userinfo replaced by ``***`` (``http://***@host/fhir``): the host and path still say which server is
meant. Every ``PacsBridgeError`` message goes through ``redact_urls``, and so does every log event
(``logs.redact_secrets``); what else is printed calls it where it is printed.
"""

from __future__ import annotations

import re

HIDDEN = "***"

# scheme://, then the userinfo up to the last '@' that can end it: a user (no '/', '?', '#' or ':') and optionally
# ':' and a password, which may hold anything but white space (SQLAlchemy lets a password hold '/' and '@'). A URL
# with '@' in its path may lose more than its userinfo; a password is never left in part.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#:]*(?::\S*)?@")


def redact_urls(text: str) -> str:
    """``text`` with the userinfo (``user:password@``, ``user@``) of every URL in it replaced by ``***@``."""
    if "@" not in text or "://" not in text:  # the common case, at the cost of two scans
        return text
    return _USERINFO.sub(rf"\g<scheme>{HIDDEN}@", text)


def redact_url(url: str) -> str:
    """``url`` as it may be printed: ``http://***@host/…`` when it carries a userinfo, else unchanged."""
    return redact_urls(url)
