"""fhir.tls and fhir.auth validation: each mode's keys, secrets only by reference, messages that say what to do."""

from __future__ import annotations

from typing import Any

import pytest

from pacs_bridge.config import parse_config
from pacs_bridge.errors import ConfigError

BASE = "https://fhir.example.org/r4"
OAUTH = {
    "mode": "oauth2_client_credentials",
    "token_url": "https://auth.example.org/token",
    "client_id": "pacs-bridge",
    "client_secret_env": "PACS_BRIDGE_FHIR_CLIENT_SECRET",
}
SMART = {
    "mode": "smart_backend_services",
    "token_url": "https://auth.example.org/token",
    "client_id": "pacs-bridge",
    "private_key_file": "/etc/pacs-bridge/fhir-key.pem",
    "scope": "system/ImagingStudy.write system/Endpoint.write",
}


def fhir(**section: Any) -> dict[str, Any]:
    return {"fhir": {"base_url": BASE, **section}}


def problems_of(data: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path="bridge.yaml")
    return caught.value.problems


def test_defaults_verify_tls_with_the_default_store_and_send_no_credentials() -> None:
    """Without fhir.tls and fhir.auth: no CA bundle, no client certificate, mode none."""
    config = parse_config(fhir(), path="bridge.yaml")

    assert (config.fhir.tls.ca_bundle, config.fhir.tls.client_certificate) == ("", "")
    assert config.fhir.auth.mode == "none"


@pytest.mark.parametrize(
    "auth",
    [
        {"mode": "bearer", "token_file": "/etc/pacs-bridge/fhir-token"},  # a static token in a file
        {"mode": "basic", "username": "bridge", "password_env": "PACS_BRIDGE_FHIR_PASSWORD"},  # from the environment
        OAUTH,  # client secret from the environment, no scope
        {**OAUTH, "scope": "system/*.write", "client_auth_method": "client_secret_post"},  # options of the mode
        SMART,  # RS384 by default
        {**SMART, "algorithm": "ES384", "kid": "key-2"},  # options of the mode
        {"mode": "none", "scope": ""},  # a key of another mode left at its default is harmless
    ],
)
def test_each_mode_with_its_keys_is_valid(auth: dict[str, str]) -> None:
    """Every mode accepts its required keys and its options."""
    assert parse_config(fhir(auth=auth), path="bridge.yaml").fhir.auth.mode == auth["mode"]


@pytest.mark.parametrize(
    ("key", "instead"),
    [
        ("token", "'token_env' or 'token_file'"),
        ("password", "'password_env' or 'password_file'"),
        ("client_secret", "'client_secret_env' or 'client_secret_file'"),
        ("private_key", "'private_key_file'"),
    ],
)
def test_inline_secret_is_refused_naming_the_keys_to_use_and_never_quoting_it(key: str, instead: str) -> None:
    """A secret written in the file is refused with where it belongs; its value appears in no message."""
    problems = problems_of(fhir(auth={"mode": "none", key: "hunter2-inline"}))

    assert problems == (
        f"at 'fhir.auth.{key}': secrets are not accepted in the configuration file; name an environment variable "
        f"or a file (readable only by the bridge's user) that holds it, with {instead}",
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(fhir(auth={"mode": "none", key: "hunter2-inline"}), path="bridge.yaml")
    assert "hunter2-inline" not in str(caught.value) and caught.value.__cause__ is None


def test_secret_written_where_its_variable_name_belongs_is_refused_without_quoting_it() -> None:
    """password_env holds a name; a value that cannot be one is refused, and not echoed back."""
    problems = problems_of(fhir(auth={"mode": "basic", "username": "u", "password_env": "s3cr3t!pass"}))

    assert len(problems) == 1 and problems[0].startswith("at 'fhir.auth.password_env': expected the name of an")
    assert "s3cr3t!pass" not in problems[0]


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        # bearer without its token
        ({"mode": "bearer"}, "mode bearer needs exactly one of token_env or token_file"),
        # both sources: which one wins would be a guess
        (
            {"mode": "bearer", "token_env": "T", "token_file": "/t"},
            "mode bearer needs exactly one of token_env or token_file",
        ),
        # basic without a username
        ({"mode": "basic", "password_env": "P"}, "mode basic needs username"),
        # client credentials without an endpoint
        (
            {k: v for k, v in OAUTH.items() if k != "token_url"},
            "mode oauth2_client_credentials needs token_url",
        ),
        # SMART needs a scope in its token request
        ({k: v for k, v in SMART.items() if k != "scope"}, "mode smart_backend_services needs scope"),
        # a key of another mode, set: probably a mode switched halfway
        (
            {**SMART, "client_secret_env": "S"},
            "client_secret_env is not used with mode smart_backend_services; remove it or change the mode",
        ),
    ],
)
def test_mode_lacking_a_key_or_given_another_modes_key_is_reported(auth: dict[str, str], problem: str) -> None:
    """The message names the mode and the key."""
    assert problems_of(fhir(auth=auth)) == (f"at 'fhir.auth': {problem}",)


def test_unknown_mode_and_algorithm_are_reported_with_the_choices() -> None:
    """Typos in mode or algorithm are caught at check-config."""
    problems = problems_of(fhir(auth={**SMART, "algorithm": "RS256"}))

    assert problems == ("at 'fhir.auth.algorithm': Input should be 'RS384' or 'ES384', got 'RS256'",)


def test_client_key_without_a_certificate_is_reported() -> None:
    """A key alone cannot authenticate: both, or neither."""
    assert problems_of(fhir(tls={"client_key": "/k.pem"})) == (
        "at 'fhir.tls': client_key is set without client_certificate; set both for mutual TLS, or neither",
    )
