"""Token handling and redaction in the FHIR auth adapter, with the token endpoint faked by httpx.MockTransport (the
real flows run in tests/integration/test_fhir_auth.py)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.auth import BackendServicesAuth, ClientCredentialsAuth, TokenAuth
from pacs_bridge.fhir.client import redact_credentials

TOKEN_URL = "https://auth.example.org/token"
SECRET = "s3cret+/=&"


def token_client(answer: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(answer))


def oauth(answer: Callable[[httpx.Request], httpx.Response], now: list[float] | None = None) -> ClientCredentialsAuth:
    clock = now or [0.0]
    return ClientCredentialsAuth(
        token_client(answer), token_url=TOKEN_URL, client_id="bridge", client_secret=SECRET, monotonic=lambda: clock[0]
    )


def first_header(auth: TokenAuth) -> str:
    """The Authorization header the flow puts on a request (the FHIR server is not contacted)."""
    flow = auth.sync_auth_flow(httpx.Request("PUT", "https://fhir.example.org/r4/ImagingStudy/x"))
    return next(flow).headers["Authorization"]


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [
        (400, {"error": "invalid_scope"}, False),  # configuration: the scope is not granted
        (401, {"error": "invalid_client"}, False),  # configuration: wrong id or secret
        (404, {}, False),  # configuration: wrong token_url
        (408, {}, True),  # the endpoint timed out
        (429, {}, True),  # rate limited
        (503, {}, True),  # down for a moment
        (200, {"token_type": "bearer"}, True),  # a broken answer without access_token
        (200, {"access_token": "t", "token_type": "mac"}, True),  # not a bearer token
    ],
)
def test_token_endpoint_answers_are_classified_retryable_or_not(status: int, body: object, retryable: bool) -> None:
    """Refusals of the client are configuration errors; unavailability keeps the study pending."""
    auth = oauth(lambda request: httpx.Response(status, json=body))

    with pytest.raises(PublishError) as caught:
        first_header(auth)

    assert caught.value.retryable is retryable
    assert caught.value.http_status == status
    assert TOKEN_URL in caught.value.detail


@pytest.mark.parametrize(
    ("expires_in", "reused_until"),
    [
        (3600, 3570.0),  # refreshed 30 s before it expires
        ("3600", 3570.0),  # some servers send digits as a string
        (20, 10.0),  # a short-lived token: at half its lifetime
    ],
)
def test_token_is_reused_until_its_margin_then_fetched_again(expires_in: object, reused_until: float) -> None:
    """expires_in minus min(30 s, half the lifetime)."""
    issued = []

    def answer(request: httpx.Request) -> httpx.Response:
        issued.append(f"t{len(issued)}")
        return httpx.Response(200, json={"access_token": issued[-1], "token_type": "Bearer", "expires_in": expires_in})

    now = [0.0]
    auth = oauth(answer, now)
    assert first_header(auth) == "Bearer t0"
    now[0] = reused_until - 0.001
    assert first_header(auth) == "Bearer t0"
    now[0] = reused_until
    assert first_header(auth) == "Bearer t1"


def test_client_secret_basic_form_encodes_the_secret_and_errors_never_show_it() -> None:
    """RFC 6749 2.3.1 encoding; an endpoint that echoes the credentials gets them redacted."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        echoed = f"bad credentials {request.headers['Authorization']} {SECRET}"
        return httpx.Response(401, json={"error": "invalid_client", "error_description": echoed})

    with pytest.raises(PublishError) as caught:
        first_header(oauth(answer))

    credentials = base64.b64decode(seen[0].headers["Authorization"].removeprefix("Basic ")).decode()
    assert credentials == "bridge:s3cret%2B%2F%3D%26"
    assert parse_qs(seen[0].content.decode()) == {"grant_type": ["client_credentials"]}
    assert SECRET not in str(caught.value)
    assert seen[0].headers["Authorization"].removeprefix("Basic ") not in str(caught.value)
    assert "[redacted]" in str(caught.value)


def test_backend_services_assertion_has_the_smart_claims() -> None:
    """iss = sub = client id, aud = token endpoint, random jti, exp at most five minutes after iat."""
    key = ec.generate_private_key(ec.SECP384R1())
    forms: list[dict[str, list[str]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        forms.append(parse_qs(request.content.decode()))
        return httpx.Response(200, json={"access_token": "t", "token_type": "bearer", "expires_in": 300})

    auth = BackendServicesAuth(
        token_client(answer), token_url=TOKEN_URL, client_id="bridge", private_key=key, algorithm="ES384", scope="s"
    )
    first_header(auth)
    second = auth.client_assertion()

    form = forms[0]
    assert (form["grant_type"], form["scope"]) == (["client_credentials"], ["s"])
    claims = jwt.decode(form["client_assertion"][0], key.public_key(), algorithms=["ES384"], audience=TOKEN_URL)
    assert (claims["iss"], claims["sub"]) == ("bridge", "bridge")
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


@pytest.mark.parametrize(
    ("text", "authorization", "expected"),
    [
        ("refused Bearer abc.def", "Bearer abc.def", "refused Bearer [redacted]"),  # an echoed token
        (
            f"got {base64.b64encode(b'u:pw').decode()} and pw",
            f"Basic {base64.b64encode(b'u:pw').decode()}",
            "got [redacted] and [redacted]",
        ),  # Basic: the encoded pair and the decoded password
        ("Basic !!notbase64", "Basic !!notbase64", "Basic [redacted]"),  # undecodable: still redacted raw
        ("nothing to hide", None, "nothing to hide"),  # no credentials sent
    ],
)
def test_server_messages_lose_the_credentials_that_were_sent(
    text: str, authorization: str | None, expected: str
) -> None:
    """What the FHIR server says goes into last_error and logs; the credentials it may quote do not."""
    assert redact_credentials(text, authorization) == expected


def test_reprs_show_no_secret() -> None:
    """An auth object printed in a traceback or a debugger shows its type only."""
    auth = oauth(lambda request: httpx.Response(200, json=json.loads('{"access_token": "t"}')))

    assert repr(auth) == "ClientCredentialsAuth(...)"
