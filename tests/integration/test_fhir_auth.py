"""FHIR security end to end: every auth mode and TLS option publishes through the real FHIR test server, behind
a proxy written in the tests that checks the Authorization header, with tokens from a token endpoint written in
the tests (it verifies client secrets and JWT assertion signatures, and counts token requests)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import structlog
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pacs_bridge.cli import main
from pacs_bridge.config import parse_config
from pacs_bridge.debounce import RetrySettings
from pacs_bridge.fhir.auth import (
    AuthSettings,
    CredentialsError,
    SecretAuth,
    SecretSource,
    TlsSettings,
    make_auth,
    make_ssl_context,
)
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.imaging_study import MappingSettings
from pacs_bridge.index.models import Study
from pacs_bridge.index.repository import Index
from pacs_bridge.publish.publisher import Publisher, PublishOutcome
from pacs_bridge.records import InstanceRecord, SeriesAttributes, StudyAttributes
from pacs_bridge.wiring import open_fhir_http
from tests.conftest import QUIET, FakeClock
from tests.support.auth_proxy import AuthProxy, ServerTls
from tests.support.certificates import Pki, make_pki
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import uid
from tests.support.token_server import TokenServer

pytestmark = pytest.mark.fhir_server

CLIENT_ID = "pacs-bridge"
CLIENT_SECRET = "cs-7c1f0e2b-never-log-me"
PASSWORD = "pw-4b9d-never-log-me"
STATIC_TOKEN = "static-9e3a-never-log-me"
SCOPE = "system/ImagingStudy.write system/Endpoint.write"
MAPPING = MappingSettings(endpoints=())
RETRY = RetrySettings(base=timedelta(seconds=10), cap=timedelta(minutes=5), jitter_fraction=0.0)


def record(study: str) -> InstanceRecord:
    return InstanceRecord(
        study=StudyAttributes(study_uid=uid(study), patient_id="PAT-1", study_date="20240315", study_time="1015"),
        series=SeriesAttributes(series_uid=uid(f"{study}.1"), modality="CT", series_number=1),
        sop_instance_uid=uid(f"{study}.1.1"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1,
    )


def publish(index: Index, http: httpx.Client, base_url: str, clock: FakeClock, *studies: str) -> dict[str, str]:
    """Index one instance of each study, let them fall due, run one publishing pass; outcomes by UID suffix."""
    publisher = Publisher(
        index=index,
        fhir=FhirClient(http, base_url=base_url),
        mapping=MAPPING,
        retry=RETRY,
        clock=clock,
        claimer="test",
        random_fraction=lambda: 0.5,
    )
    for study in studies:
        index.record_instance(record(study), received_at=clock())
    clock.advance(QUIET)
    outcomes = publisher.run_once()
    return {study_uid.removeprefix(uid("")): outcome.value for study_uid, outcome in outcomes.items()}


def last_error(engine: Engine, study: str) -> str:
    with Session(engine) as session:
        row = session.scalars(select(Study).where(Study.study_uid == uid(study))).one()
        return str(row.last_error)


PUBLISHED = PublishOutcome.PUBLISHED.value


# ---- fixtures ----------------------------------------------------------------------------------------------------
class Keys:
    """The bridge's private keys (PEM files) and their public halves, registered at the token server."""

    def __init__(self, directory: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.rsa_pem = self._write(self.rsa, directory / "rs384.pem")
        self.ec_pem = self._write(self.ec, directory / "es384.pem")

    @staticmethod
    def _write(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> str:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def tokens(keys: Keys) -> Iterator[TokenServer]:
    """The token endpoint: one client with a secret, the same client id with an RS384 and an ES384 key."""
    with TokenServer(
        secrets={CLIENT_ID: CLIENT_SECRET},
        public_keys={CLIENT_ID: keys.rsa.public_key(), f"{CLIENT_ID}-es": keys.ec.public_key()},
    ) as server:
        yield server


@pytest.fixture
def token_proxy(fresh_fhir_server: FhirTestServer, tokens: TokenServer) -> Iterator[AuthProxy]:
    """The FHIR server behind a proxy that lets through only bearer tokens the token endpoint issued and still
    honours."""

    def accept(header: str | None) -> bool:
        return header is not None and header.startswith("Bearer ") and tokens.is_valid(header.removeprefix("Bearer "))

    with AuthProxy(upstream_port=fresh_fhir_server.port, accept=accept, echo_credentials=True) as proxy:
        yield proxy


@pytest.fixture
def token_http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def authed_client(auth: SecretAuth | None, **kwargs: object) -> httpx.Client:
    return httpx.Client(auth=auth, timeout=10, **kwargs)  # type: ignore[arg-type]


def client_credentials(token_http: httpx.Client, tokens: TokenServer, **overrides: object) -> SecretAuth | None:
    settings = AuthSettings(
        mode="oauth2_client_credentials",
        token_url=tokens.token_url,
        client_id=CLIENT_ID,
        client_secret=SecretSource(key="fhir.auth.client_secret", env="TEST_FHIR_CLIENT_SECRET"),
        scope=SCOPE,
        **overrides,  # type: ignore[arg-type]
    )
    return make_auth(settings, token_http=token_http)


# ---- each mode publishes -----------------------------------------------------------------------------------------
def test_bearer_token_from_a_file_publishes_through_a_proxy_that_checks_it(
    index: Index, fresh_fhir_server: FhirTestServer, clock: FakeClock, token_http: httpx.Client, tmp_path: Path
):
    """mode bearer: the token read from token_file goes in every request; the server gets the study."""
    token_file = tmp_path / "fhir-token"
    token_file.write_text(f"{STATIC_TOKEN}\n", encoding="utf-8")
    settings = AuthSettings(mode="bearer", token=SecretSource(key="fhir.auth.token", file=str(token_file)))
    with (
        AuthProxy(upstream_port=fresh_fhir_server.port, accept=lambda h: h == f"Bearer {STATIC_TOKEN}") as proxy,
        authed_client(make_auth(settings, token_http=token_http)) as http,
    ):
        assert publish(index, http, proxy.base_url, clock, "1") == {"1": PUBLISHED}
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1
    assert proxy.refused == 0


def test_basic_credentials_from_the_environment_publish(
    index: Index,
    fresh_fhir_server: FhirTestServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
):
    """mode basic: username and the password from password_env; a wrong password is refused by the proxy."""
    monkeypatch.setenv("TEST_FHIR_PASSWORD", PASSWORD)
    expected = httpx.BasicAuth("bridge", PASSWORD)._auth_header
    settings = AuthSettings(
        mode="basic", username="bridge", password=SecretSource(key="fhir.auth.password", env="TEST_FHIR_PASSWORD")
    )
    with (
        AuthProxy(upstream_port=fresh_fhir_server.port, accept=lambda h: h == expected) as proxy,
        authed_client(make_auth(settings, token_http=token_http)) as http,
    ):
        assert publish(index, http, proxy.base_url, clock, "1") == {"1": PUBLISHED}
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_client_credentials_publish_several_studies_with_one_token(
    index: Index,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    fresh_fhir_server: FhirTestServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
):
    """oauth2_client_credentials: one token request serves every PUT while the token is valid."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    with authed_client(client_credentials(token_http, tokens, client_auth_method=method)) as http:
        outcomes = publish(index, http, token_proxy.base_url, clock, "1", "2", "3")
    assert outcomes == {"1": PUBLISHED, "2": PUBLISHED, "3": PUBLISHED}
    assert [r.granted for r in tokens.requests] == [True]
    assert tokens.requests[0].form["scope"] == SCOPE
    assert fresh_fhir_server.request_counts() == {"PUT ImagingStudy": 3}
    assert token_proxy.refused == 0


@pytest.mark.parametrize(("algorithm", "client_id"), [("RS384", CLIENT_ID), ("ES384", f"{CLIENT_ID}-es")])
def test_smart_backend_services_publish_with_a_signed_assertion(
    index: Index,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    fresh_fhir_server: FhirTestServer,
    clock: FakeClock,
    token_http: httpx.Client,
    keys: Keys,
    algorithm: str,
    client_id: str,
):
    """smart_backend_services: the token server verifies the JWT's signature with the public key, its claims and
    the kid; one token serves every PUT."""
    settings = AuthSettings(
        mode="smart_backend_services",
        token_url=tokens.token_url,
        client_id=client_id,
        private_key_file=keys.rsa_pem if algorithm == "RS384" else keys.ec_pem,
        algorithm=algorithm,  # type: ignore[arg-type]
        kid="bridge-key-1",
        scope=SCOPE,
    )
    with authed_client(make_auth(settings, token_http=token_http)) as http:
        assert publish(index, http, token_proxy.base_url, clock, "1", "2") == {"1": PUBLISHED, "2": PUBLISHED}
    assert [(r.client_id, r.granted) for r in tokens.requests] == [(client_id, True)]
    request = tokens.requests[0]
    assert request.jwt_header == {"alg": algorithm, "kid": "bridge-key-1", "typ": "JWT"}
    assert request.form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert request.form["scope"] == SCOPE
    assert fresh_fhir_server.versions("ImagingStudy", uid("2")) == 1


def test_the_bridge_configuration_wires_smart_backend_services_and_a_ca_bundle(
    index: Index,
    fresh_fhir_server: FhirTestServer,
    tokens: TokenServer,
    clock: FakeClock,
    keys: Keys,
    tmp_path: Path,
):
    """From YAML keys to a published study: fhir.auth and fhir.tls as the service builds its clients (HTTPS proxy
    signed by a private CA, token endpoint over plain HTTP on loopback)."""
    pki = make_pki(tmp_path / "pki")
    config = parse_config(
        {
            "fhir": {
                "base_url": "https://placeholder.invalid/fhir",
                "tls": {"ca_bundle": str(pki.ca_pem)},
                "auth": {
                    "mode": "smart_backend_services",
                    "token_url": tokens.token_url,
                    "client_id": CLIENT_ID,
                    "private_key_file": keys.rsa_pem,
                    "scope": SCOPE,
                },
            }
        },
        path="bridge.yaml",
    )
    tls = ServerTls(certificate=pki.server_cert_pem, key=pki.server_key_pem)

    def accept(header: str | None) -> bool:
        return header is not None and tokens.is_valid(header.removeprefix("Bearer "))

    http, token_http = open_fhir_http(config)
    with http, token_http, AuthProxy(upstream_port=fresh_fhir_server.port, accept=accept, tls=tls) as proxy:
        assert publish(index, http, proxy.base_url, clock, "1") == {"1": PUBLISHED}
    assert tokens.granted == 1


# ---- token lifetime ----------------------------------------------------------------------------------------------
def test_token_is_fetched_again_shortly_before_it_expires(
    index: Index,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
):
    """A token living 300 s is reused within 270 s, and replaced (without a 401) after that."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    monotonic = FakeMonotonic()
    auth = make_auth(
        AuthSettings(
            mode="oauth2_client_credentials",
            token_url=tokens.token_url,
            client_id=CLIENT_ID,
            client_secret=SecretSource(key="fhir.auth.client_secret", env="TEST_FHIR_CLIENT_SECRET"),
        ),
        token_http=token_http,
        monotonic=monotonic,
    )
    with authed_client(auth) as http:
        publish(index, http, token_proxy.base_url, clock, "1")
        monotonic.now += 269
        publish(index, http, token_proxy.base_url, clock, "2")
        assert tokens.granted == 1
        monotonic.now += 2
        assert publish(index, http, token_proxy.base_url, clock, "3") == {"3": PUBLISHED}
    assert tokens.granted == 2
    assert token_proxy.refused == 0


def test_token_refused_with_401_is_replaced_and_the_request_sent_once_more(
    index: Index,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    fresh_fhir_server: FhirTestServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
):
    """The server revokes the token: the PUT gets 401, a new token is fetched and the PUT repeated once."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    with authed_client(client_credentials(token_http, tokens)) as http:
        publish(index, http, token_proxy.base_url, clock, "1")
        tokens.revoke_all()
        assert publish(index, http, token_proxy.base_url, clock, "2") == {"2": PUBLISHED}
    assert tokens.granted == 2
    assert token_proxy.refused == 1
    assert fresh_fhir_server.request_counts() == {"PUT ImagingStudy": 2}


def test_second_401_after_a_fresh_token_fails_the_study_without_a_loop(
    index: Index,
    engine: Engine,
    fresh_fhir_server: FhirTestServer,
    tokens: TokenServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
):
    """A server that refuses every token (wrong audience, missing rights) costs two PUTs and two token requests,
    then the study is failed with a reason that points at fhir.auth."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    with (
        AuthProxy(upstream_port=fresh_fhir_server.port, accept=lambda h: False) as proxy,
        authed_client(client_credentials(token_http, tokens)) as http,
    ):
        assert publish(index, http, proxy.base_url, clock, "1") == {"1": PublishOutcome.FAILED.value}
    assert (tokens.granted, proxy.refused) == (2, 2)
    assert "check fhir.auth" in last_error(engine, "1")


# ---- token endpoint failures -------------------------------------------------------------------------------------
def test_wrong_client_secret_fails_the_study_with_the_reason_and_is_not_retried(
    index: Index,
    engine: Engine,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
):
    """401 invalid_client from the token endpoint is a configuration error: failed, nothing sent to FHIR."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", "not-the-secret")
    with authed_client(client_credentials(token_http, tokens)) as http:
        assert publish(index, http, token_proxy.base_url, clock, "1") == {"1": PublishOutcome.FAILED.value}
    error = last_error(engine, "1")
    assert "token endpoint" in error and "invalid_client" in error and "not-the-secret" not in error
    assert token_proxy.authorizations == []


@pytest.mark.parametrize("status", [503, 429])
def test_token_endpoint_unavailable_keeps_the_study_pending(
    index: Index,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
):
    """A 5xx or 429 from the token endpoint is retried later; the next attempt publishes."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    tokens.program(status)
    with authed_client(client_credentials(token_http, tokens)) as http:
        assert publish(index, http, token_proxy.base_url, clock, "1") == {"1": PublishOutcome.RETRY_SCHEDULED.value}
        assert index.count_by_state().pending == 1
        clock.advance(timedelta(seconds=10))
        assert publish(index, http, token_proxy.base_url, clock) == {"1": PUBLISHED}


def test_unreachable_token_endpoint_keeps_the_study_pending(
    index: Index,
    engine: Engine,
    token_proxy: AuthProxy,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
):
    """Connection refused at the token endpoint is retryable, and the error names the token endpoint."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    auth = make_auth(
        AuthSettings(
            mode="oauth2_client_credentials",
            token_url="http://127.0.0.1:9/token",
            client_id=CLIENT_ID,
            client_secret=SecretSource(key="fhir.auth.client_secret", env="TEST_FHIR_CLIENT_SECRET"),
        ),
        token_http=token_http,
    )
    with authed_client(auth) as http:
        assert publish(index, http, token_proxy.base_url, clock, "1") == {"1": PublishOutcome.RETRY_SCHEDULED.value}
    assert "cannot reach the token endpoint http://127.0.0.1:9/token" in last_error(engine, "1")


# ---- secrets stay secret -----------------------------------------------------------------------------------------
def test_secrets_never_appear_in_logs_or_recorded_errors(
    index: Index,
    engine: Engine,
    fresh_fhir_server: FhirTestServer,
    tokens: TokenServer,
    clock: FakeClock,
    token_http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """Even with debug logging and a server that quotes the Authorization header in its OperationOutcome, neither
    the password, the client secret nor an access token reaches a log line or the study's last_error."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("TEST_FHIR_PASSWORD", PASSWORD)
    basic = make_auth(
        AuthSettings(
            mode="basic", username="bridge", password=SecretSource(key="fhir.auth.password", env="TEST_FHIR_PASSWORD")
        ),
        token_http=token_http,
    )
    oauth = client_credentials(token_http, tokens)
    caplog.set_level(logging.DEBUG)
    with (
        structlog.testing.capture_logs() as events,
        AuthProxy(upstream_port=fresh_fhir_server.port, accept=lambda h: False, echo_credentials=True) as proxy,
        authed_client(basic) as basic_http,
        authed_client(oauth) as oauth_http,
    ):
        assert publish(index, basic_http, proxy.base_url, clock, "1") == {"1": PublishOutcome.FAILED.value}
        assert publish(index, oauth_http, proxy.base_url, clock, "2") == {"2": PublishOutcome.FAILED.value}
    issued = [header.removeprefix("Bearer ") for header in proxy.authorizations if header and "Bearer" in header]
    assert len(issued) == 2, "two tokens were fetched and refused"
    seen = "\n".join([caplog.text, repr(events), last_error(engine, "1"), last_error(engine, "2"), repr(oauth)])
    for secret in (PASSWORD, CLIENT_SECRET, *issued, httpx.BasicAuth("bridge", PASSWORD)._auth_header):
        assert secret not in seen
    assert "[redacted]" in last_error(engine, "1") and "[redacted]" in last_error(engine, "2")


# ---- TLS ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def test_server_certificate_from_an_unknown_ca_is_refused_by_default(
    index: Index, engine: Engine, fresh_fhir_server: FhirTestServer, clock: FakeClock, pki: Pki
):
    """Verification is on by default: a private CA's server is not trusted, the study stays pending, and the
    error tells the operator about fhir.tls.ca_bundle."""
    tls = ServerTls(certificate=pki.server_cert_pem, key=pki.server_key_pem)
    with (
        AuthProxy(upstream_port=fresh_fhir_server.port, tls=tls) as proxy,
        authed_client(None, verify=make_ssl_context(TlsSettings())) as http,
    ):
        assert publish(index, http, proxy.base_url, clock, "1") == {"1": PublishOutcome.RETRY_SCHEDULED.value}
    assert "fhir.tls.ca_bundle" in last_error(engine, "1")
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 0


def test_server_certificate_is_accepted_with_its_ca_bundle(
    index: Index, fresh_fhir_server: FhirTestServer, clock: FakeClock, pki: Pki
):
    """fhir.tls.ca_bundle trusts the private CA: the study is published over HTTPS."""
    tls = ServerTls(certificate=pki.server_cert_pem, key=pki.server_key_pem)
    with (
        AuthProxy(upstream_port=fresh_fhir_server.port, tls=tls) as proxy,
        authed_client(None, verify=make_ssl_context(TlsSettings(ca_bundle=str(pki.ca_pem)))) as http,
    ):
        assert publish(index, http, proxy.base_url, clock, "1") == {"1": PUBLISHED}
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1


def test_mutual_tls_is_accepted_with_the_client_certificate_and_refused_without(
    index: Index, engine: Engine, fresh_fhir_server: FhirTestServer, clock: FakeClock, pki: Pki
):
    """A server requiring a client certificate refuses the bridge without one (the study stays pending) and
    accepts it with fhir.tls.client_certificate and client_key."""
    tls = ServerTls(certificate=pki.server_cert_pem, key=pki.server_key_pem, client_ca=pki.ca_pem)
    without = TlsSettings(ca_bundle=str(pki.ca_pem))
    with_cert = TlsSettings(
        ca_bundle=str(pki.ca_pem), client_certificate=str(pki.client_cert_pem), client_key=str(pki.client_key_pem)
    )
    with AuthProxy(upstream_port=fresh_fhir_server.port, tls=tls) as proxy:
        with authed_client(None, verify=make_ssl_context(without)) as http:
            assert publish(index, http, proxy.base_url, clock, "1") == {"1": PublishOutcome.RETRY_SCHEDULED.value}
        assert "fhir.tls" in last_error(engine, "1")
        clock.advance(timedelta(seconds=10))
        with authed_client(None, verify=make_ssl_context(with_cert)) as http:
            assert publish(index, http, proxy.base_url, clock) == {"1": PUBLISHED}
    assert fresh_fhir_server.versions("ImagingStudy", uid("1")) == 1


# ---- credentials that cannot be read -----------------------------------------------------------------------------
def test_missing_secret_stops_the_bridge_naming_the_key_and_the_fix(token_http: httpx.Client, tmp_path: Path):
    """An unset variable or unreadable file is reported before anything starts, with what to do."""
    unset = AuthSettings(mode="bearer", token=SecretSource(key="fhir.auth.token", env="TEST_UNSET_VARIABLE_X"))
    with pytest.raises(CredentialsError, match=r"fhir\.auth\.token_env names the environment variable"):
        make_auth(unset, token_http=token_http)
    missing = AuthSettings(mode="bearer", token=SecretSource(key="fhir.auth.token", file=str(tmp_path / "nope")))
    with pytest.raises(CredentialsError, match=r"cannot read fhir\.auth\.token_file .*nope: No such file"):
        make_auth(missing, token_http=token_http)


def test_private_key_of_the_wrong_kind_is_refused_naming_both_keys(token_http: httpx.Client, keys: Keys):
    """An EC key configured for RS384 cannot sign: the message names algorithm and private_key_file."""
    settings = AuthSettings(
        mode="smart_backend_services",
        token_url="https://auth.example.org/token",
        client_id=CLIENT_ID,
        private_key_file=keys.ec_pem,
        algorithm="RS384",
        scope=SCOPE,
    )
    with pytest.raises(
        CredentialsError,
        match=r"fhir\.auth\.algorithm RS384 needs an RSA private key, .* holds an EC key on secp384r1 \(use ES384\)",
    ):
        make_auth(settings, token_http=token_http)


def test_bridge_with_an_unset_secret_variable_exits_at_start_naming_it(tmp_path: Path):
    """pacs-bridge run stops before opening anything, and says which variable to set and how."""
    config = tmp_path / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:///{tmp_path / 'index.db'}"},
                "dicom": {"bind": "127.0.0.1", "port": 0},
                "fhir": {
                    "base_url": "https://fhir.example.org/r4",
                    "auth": {"mode": "basic", "username": "bridge", "password_env": "TEST_UNSET_FHIR_PASSWORD"},
                },
            }
        ),
        encoding="utf-8",
    )
    env = {key: value for key, value in os.environ.items() if key != "TEST_UNSET_FHIR_PASSWORD"}
    result = subprocess.run(
        [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pacs-bridge: fhir.auth.password_env names the environment variable TEST_UNSET_FHIR_PASSWORD, which is "
        "not set for the bridge; set it (systemd: Environment= or EnvironmentFile= in a drop-in readable by root "
        "only), or use fhir.auth.password_file"
    )
    assert not (tmp_path / "index.db").exists()


# ---- operator commands use the same credentials ------------------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write_config(tmp_path: Path, database_url: str, base_url: str, auth: dict[str, str]) -> str:
    path = tmp_path / "bridge.yaml"
    document = {"database": {"url": database_url}, "fhir": {"base_url": base_url, "auth": auth}}
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


def test_check_config_online_obtains_a_token_and_says_so_or_names_the_refusal(
    index: Index,
    database_url: str,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """check-config --online reads metadata through the checking proxy with a token; a wrong secret fails with
    the token endpoint's answer, and the secret is not printed."""
    auth = {
        "mode": "oauth2_client_credentials",
        "token_url": tokens.token_url,
        "client_id": CLIENT_ID,
        "client_secret_env": "TEST_FHIR_CLIENT_SECRET",
    }
    config = write_config(tmp_path, database_url, token_proxy.base_url, auth)
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    code, out = run_cli(capsys, "check-config", "--online", "--config", config)
    assert code == 0, out
    assert f"ok   fhir: GET {token_proxy.base_url}/metadata: CapabilityStatement" in out
    assert f"token obtained from {tokens.token_url}" in out
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", "wrong-secret-value")
    code, out = run_cli(capsys, "check-config", "--online", "--config", config)
    assert code == 1
    assert f"FAIL fhir: GET {token_proxy.base_url}/metadata: HTTP 401: the token endpoint" in out
    assert "invalid_client" in out and "wrong-secret-value" not in out
    monkeypatch.delenv("TEST_FHIR_CLIENT_SECRET")
    code, out = run_cli(capsys, "check-config", "--online", "--config", config)
    assert code == 1
    assert "FAIL fhir: fhir.auth.client_secret_env names the environment variable TEST_FHIR_CLIENT_SECRET" in out


def test_reconcile_reads_the_server_with_the_bridges_credentials(
    index: Index,
    database_url: str,
    token_proxy: AuthProxy,
    tokens: TokenServer,
    clock: FakeClock,
    token_http: httpx.Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """pacs-bridge reconcile behind a server that demands a token finds the published study in place."""
    monkeypatch.setenv("TEST_FHIR_CLIENT_SECRET", CLIENT_SECRET)
    with authed_client(client_credentials(token_http, tokens)) as http:
        assert publish(index, http, token_proxy.base_url, clock, "1") == {"1": PUBLISHED}
    auth = {
        "mode": "oauth2_client_credentials",
        "token_url": tokens.token_url,
        "client_id": CLIENT_ID,
        "client_secret_env": "TEST_FHIR_CLIENT_SECRET",
    }
    config = write_config(tmp_path, database_url, token_proxy.base_url, auth)
    code, out = run_cli(capsys, "reconcile", "--config", config)
    assert code == 0, out
    assert f"1 published studies checked against {token_proxy.base_url}: 0 discrepancies" in out
    assert token_proxy.refused == 0
