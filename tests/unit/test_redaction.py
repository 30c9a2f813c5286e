"""Unit tests for ``pacs_bridge.redaction``: no URL is printed with its userinfo or a secret query parameter."""

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
    ("postgresql+psycopg://bridge:pa ss@db/pacs", "postgresql+psycopg://***@db/pacs"),  # white space in the password
    ("postgresql+psycopg://my user:s3cret@db/pacs", "postgresql+psycopg://***@db/pacs"),  # and in the user
    ("postgresql+psycopg://bridge@db/pacs?password=s3cret", "postgresql+psycopg://***@db/pacs?password=***"),
    ("postgresql://db/pacs?sslmode=require&PASSWORD=s3 cret", "postgresql://db/pacs?sslmode=require&PASSWORD=***"),
    ("https://fhir/r4?access_token=abc&_format=json", "https://fhir/r4?access_token=***&_format=json"),
    ("https://fhir/r4?api_key=abc#top", "https://fhir/r4?api_key=***#top"),
    (
        "https://fhir/r4?pass=a&pwd=b&secret=c&token=d&key=e",
        "https://fhir/r4?pass=***&pwd=***&secret=***&token=***&key=***",
    ),
    ("https://fhir/r4?_count=10&page=2", "https://fhir/r4?_count=10&page=2"),  # nothing secret: unchanged
    # not a URL (no "://"): everything before the last '@' is hidden
    ("postgresql+psycopg:bridge:s3cret@db/pacs", "***@db/pacs"),
    ("bridge:pa ss@db/pacs", "***@db/pacs"),
    ("https:user:s3cret@fhir.example.org/r4", "***@fhir.example.org/r4"),
]


@pytest.mark.parametrize(("url", "printed"), URL_ROWS)
def test_redact_url_hides_the_whole_userinfo_and_keeps_host_and_path(url: str, printed: str) -> None:
    """The user and password give way to ***; the scheme, host, port and path stay, so the server is known."""
    assert redact_url(url) == printed


def test_redact_urls_hides_every_url_in_a_message_and_leaves_the_rest() -> None:
    """An error message quoting two URLs, each on its own line, and an e-mail address: both URLs lose their
    userinfo, the rest stays."""
    message = "cannot reach 'http://u:pw1@a/fhir'\nnor postgresql://v:pw2@b/db\nask admin@example.org"
    assert redact_urls(message) == "cannot reach 'http://***@a/fhir'\nnor postgresql://***@b/db\nask admin@example.org"


def test_a_password_with_white_space_is_hidden_whole_even_when_more_follows_on_its_line() -> None:
    """The userinfo runs to the last '@' of its line: an '@' after the URL (an e-mail address) is taken for part
    of a password with spaces in it, and hidden with it, rather than a part of the password being shown."""
    message = "cannot reach postgresql://v:pw 2@b/db (took 3 s)"
    assert redact_urls(message) == "cannot reach postgresql://***@b/db (took 3 s)"
    assert redact_urls("postgresql://v:pw2@b/db; ask admin@example.org") == "postgresql://***@example.org"


def test_secret_parameters_are_hidden_in_connection_strings_and_messages() -> None:
    """key=value settings (libpq's form) and query parameters alike; the value runs to '&', '#' or the end of
    its line, spaces included."""
    assert redact_urls("host=db password=s3 cret") == "host=db password=***"
    assert redact_urls("GET https://fhir/r4/metadata?token=abc: 401\nnext line") == (
        "GET https://fhir/r4/metadata?token=***\nnext line"
    )
    assert redact_urls("max_associations=16 port=104") == "max_associations=16 port=104"


def test_a_url_like_string_without_slashes_in_a_message_loses_its_userinfo() -> None:
    """A value quoted as written (``scheme:user:password@host``, ``user:password@host``)."""
    assert redact_urls("got 'postgresql+psycopg:bridge:s3cret@db/pacs'") == "got '***@db/pacs'"
    assert redact_urls("Error: contact admin@example.org") == "Error: contact admin@example.org"


def test_every_error_of_ours_quotes_urls_without_their_userinfo() -> None:
    """A PacsBridgeError's message, and a PublishError's detail (stored as a study's last_error), are redacted
    where they are made, whatever builds them."""
    unavailable = IndexUnavailableError("cannot open the index database postgresql://bridge:s3cret@db/pacs")
    publish = PublishError("cannot reach http://user:s3cret@fhir.example.org/fhir/ImagingStudy/1", retryable=True)

    assert str(unavailable) == "cannot open the index database postgresql://***@db/pacs"
    assert publish.detail == "cannot reach http://***@fhir.example.org/fhir/ImagingStudy/1"
    assert "s3cret" not in str(publish)
