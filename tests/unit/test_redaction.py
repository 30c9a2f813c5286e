"""Unit tests for ``pacs_bridge.redaction``: no URL is printed with its userinfo."""

from __future__ import annotations

import pytest

from pacs_bridge.errors import IndexUnavailableError, PublishError
from pacs_bridge.redaction import redact_url, redact_urls

URL_ROWS = [
    # (as configured, as printed)
    ("http://user:s3cret@fhir.example.org/fhir", "http://***@fhir.example.org/fhir"),  # basic auth in the URL
    ("https://TOKEN123@fhir.example.org/r4", "https://***@fhir.example.org/r4"),  # a token given as the user
    ("postgresql+psycopg://bridge:s3cret@db:5432/pacs", "postgresql+psycopg://***@db:5432/pacs"),  # SQLAlchemy URL
    ("postgresql+psycopg://postgres@127.0.0.1/test", "postgresql+psycopg://***@127.0.0.1/test"),  # a user alone
    ("postgresql://u:p@ss@db/pacs", "postgresql://***@db/pacs"),  # '@' unencoded in the password
    ("postgresql://u:p/ss@db/pacs", "postgresql://***@db/pacs"),  # '/' in the password (SQLAlchemy takes it)
    ("http://a@b.example:s3cret@host/x", "http://***@host/x"),  # '@' unencoded in the user
    ("http://:s3cret@host/fhir", "http://***@host/fhir"),  # a password without a user
    ("http://127.0.0.1:8080/fhir", "http://127.0.0.1:8080/fhir"),  # no userinfo: unchanged
    ("https://host/fhir/Patient/a@b", "https://host/fhir/Patient/a@b"),  # '@' in the path only: unchanged
    ("sqlite:///var/lib/pacs-bridge/index.db", "sqlite:///var/lib/pacs-bridge/index.db"),  # a file: unchanged
]


@pytest.mark.parametrize(("url", "printed"), URL_ROWS)
def test_redact_url_hides_the_whole_userinfo_and_keeps_host_and_path(url: str, printed: str) -> None:
    """The user and password give way to ***; the scheme, host, port and path stay, so the server is known."""
    assert redact_url(url) == printed


def test_redact_urls_hides_every_url_in_a_message_and_leaves_the_rest() -> None:
    """An error message quoting two URLs and an e-mail address: both URLs lose their userinfo, the rest stays."""
    message = "cannot reach 'http://u:pw1@a/fhir' nor postgresql://v:pw2@b/db; ask admin@example.org"
    assert redact_urls(message) == "cannot reach 'http://***@a/fhir' nor postgresql://***@b/db; ask admin@example.org"


def test_every_error_of_ours_quotes_urls_without_their_userinfo() -> None:
    """A PacsBridgeError's message, and a PublishError's detail (stored as a study's last_error), are redacted
    where they are made, whatever builds them."""
    unavailable = IndexUnavailableError("cannot open the index database postgresql://bridge:s3cret@db/pacs")
    publish = PublishError("cannot reach http://user:s3cret@fhir.example.org/fhir/ImagingStudy/1", retryable=True)

    assert str(unavailable) == "cannot open the index database postgresql://***@db/pacs"
    assert publish.detail == "cannot reach http://***@fhir.example.org/fhir/ImagingStudy/1"
    assert "s3cret" not in str(publish)
