"""The configuration file as a file: YAML mistakes reported where they are, and relative paths in it resolved
against its own directory, whatever directory the command runs in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from pacs_bridge.config import load_config, sqlite_url_against
from pacs_bridge.errors import ConfigError
from tests.support.certificates import make_pki

MINIMAL_YAML = "fhir:\n  base_url: http://127.0.0.1:8080/fhir\n"


def problem_in(tmp_path: Path, text: str) -> str:
    """The one problem load_config reports for a file holding ``text``."""
    path = tmp_path / "pacs-bridge.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == str(path)
    (problem,) = caught.value.problems
    return problem


@pytest.mark.parametrize(
    ("text", "where", "fragments"),
    [
        # a section indented one space too far: the parser's message, the line as written, and what to check
        (
            "fhir:\n  base_url: http://f\n dicom: [\n",
            "line 3, column 2",
            ("expected <block end>", "starts at line 1, column 1", "the line reads ' dicom: ['", "indentation"),
        ),
        # the line is quoted without its comment
        (
            "fhir:\n  base_url: http://f\ndicom:\n  ae_title: X     # ours\n   port: 104      # privileged\n",
            "line 5, column 4",
            ("the line reads '   port: 104';",),
        ),
        # a tab used for indentation
        ("fhir:\n\tbase_url: http://f\n", "line 2, column 1", ("cannot start any token", "spaces, not tabs")),
        # a value holding ': ' without quotes
        ("fhir:\n  base_url: a: b\n", "line 2, column 14", ("mapping values are not allowed here", "quote a value")),
        # a quote never closed: reported where it opens (the parser gives up only at the end of the file)
        (
            'fhir:\n  base_url: "http://f\n  timeout_seconds: 5\ndicom:\n  port: 104\n',
            "line 2, column 13",
            (
                "the quoted value that starts here runs on to the end of the file",
                "'  base_url: \"http://f'",
                "close the quote",
            ),
        ),
        # a [ list never closed: reported where it opens
        (
            "fhir:\n  base_url: http://f\nlisteners: [a, b\ndicom:\n  port: 104\n",
            "line 3, column 12",
            ("the [ list that starts here runs on to line 4", "'listeners: [a, b'", "close the [ list with ]"),
        ),
        # a key without its colon
        ("fhir:\n  base_url: http://f\n  version R4\n", "line 4, column 1", ("could not find expected ':'",)),
    ],
)
def test_yaml_syntax_error_names_the_file_line_and_column(
    tmp_path: Path, text: str, where: str, fragments: tuple[str, ...]
) -> None:
    """A YAML mistake is one problem for the file: where it is (from 1), what is wrong and what to do; never
    PyYAML's '<unicode string>'."""
    problem = problem_in(tmp_path, text)

    assert problem.startswith(f"not valid YAML at {where}: ")
    for fragment in fragments:
        assert fragment in problem
    assert "<unicode string>" not in problem


def test_a_section_written_twice_is_reported_with_both_lines(tmp_path: Path) -> None:
    """A second `dicom:` would silently replace the first (PyYAML keeps the last): it is an error naming both."""
    text = MINIMAL_YAML + "dicom:\n  port: 104\nlogging:\n  level: debug\ndicom:\n  port: 11112\n"

    problem = problem_in(tmp_path, text)

    assert problem.startswith("not valid YAML at line 7, column 1: the key 'dicom' appears twice in one mapping ")
    assert "(first at line 3)" in problem


def test_a_key_written_twice_inside_a_section_is_reported(tmp_path: Path) -> None:
    """Repeats are found at every level, not only among sections."""
    problem = problem_in(tmp_path, "fhir:\n  base_url: http://a\n  base_url: http://b\n")

    assert "line 3, column 3: the key 'base_url' appears twice" in problem


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    """`<<: *anchor` followed by one of the merged keys is an override, not a repeat."""
    path = tmp_path / "pacs-bridge.yaml"
    path.write_text(
        MINIMAL_YAML + "endpoints:\n"
        "  - &wado {id: pacs-a, connection_type: dicom-wado-rs, address: https://a.example.org/dicom-web}\n"
        "  - <<: *wado\n    id: pacs-b\n",
        encoding="utf-8",
    )

    config = load_config(path)

    assert [(endpoint.id, endpoint.address) for endpoint in config.endpoints] == [
        ("pacs-a", "https://a.example.org/dicom-web"),
        ("pacs-b", "https://a.example.org/dicom-web"),
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # a relative file: against the directory
        ("sqlite:///pacs-bridge.db", "sqlite:////etc/pacs-bridge/pacs-bridge.db"),
        # a relative path with a subdirectory, and the driver named
        ("sqlite+pysqlite:///state/index.db", "sqlite+pysqlite:////etc/pacs-bridge/state/index.db"),
        # a query string is kept
        ("sqlite:///index.db?timeout=5", "sqlite:////etc/pacs-bridge/index.db?timeout=5"),
        # an absolute path is left alone
        ("sqlite:////var/lib/pacs-bridge/pacs-bridge.db", "sqlite:////var/lib/pacs-bridge/pacs-bridge.db"),
        # in-memory databases have no file
        ("sqlite://", "sqlite://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        # a URI filename is SQLite's business
        ("sqlite:///file:index.db?mode=ro&uri=true", "sqlite:///file:index.db?mode=ro&uri=true"),
        # PostgreSQL has no path to resolve
        ("postgresql+psycopg://bridge@db/pacs", "postgresql+psycopg://bridge@db/pacs"),
    ],
)
def test_sqlite_url_against_a_directory(url: str, expected: str) -> None:
    """Only a relative SQLite file path changes."""
    assert sqlite_url_against(url, Path("/etc/pacs-bridge")) == expected


def test_relative_sqlite_path_is_relative_to_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From any working directory, `sqlite:///pacs-bridge.db` names the file beside the configuration file."""
    (tmp_path / "etc").mkdir()
    config_file = tmp_path / "etc" / "pacs-bridge.yaml"
    config_file.write_text(MINIMAL_YAML + "database:\n  url: sqlite:///pacs-bridge.db\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    config = load_config("etc/pacs-bridge.yaml")

    assert config.database.url == f"sqlite:///{tmp_path / 'etc' / 'pacs-bridge.db'}"


def test_the_default_database_is_beside_the_config_file_too(tmp_path: Path) -> None:
    """Without a database section, the default SQLite file resolves like a written one."""
    config_file = tmp_path / "pacs-bridge.yaml"
    config_file.write_text(MINIMAL_YAML, encoding="utf-8")

    assert load_config(config_file).database.url == f"sqlite:///{tmp_path / 'pacs-bridge.db'}"


def test_relative_tls_and_secret_files_are_relative_to_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Certificate, key and secret files named relatively are found beside the configuration, and passed on as
    absolute paths (the readability check of the DICOM TLS files passes from another working directory)."""
    directory = tmp_path / "etc"
    pki = make_pki(tmp_path / "pki")
    directory.mkdir()
    shutil.copy(pki.server_cert_pem, directory / "dicom.crt")
    shutil.copy(pki.server_key_pem, directory / "dicom.key")
    for name in ("fhir-ca.pem", "fhir-password"):
        (directory / name).write_text("x", encoding="utf-8")
    config_file = directory / "pacs-bridge.yaml"
    config_file.write_text(
        MINIMAL_YAML
        + "  tls: {ca_bundle: fhir-ca.pem}\n"
        + "  auth: {mode: basic, username: bridge, password_file: fhir-password}\n"
        + "dicom:\n  tls: {certificate: dicom.crt, private_key: dicom.key}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)

    config = load_config(config_file)

    assert config.dicom.tls.certificate == str(directory / "dicom.crt")
    assert config.dicom.tls.private_key == str(directory / "dicom.key")
    assert config.fhir.tls.ca_bundle == str(directory / "fhir-ca.pem")
    assert config.fhir.auth.password_file == str(directory / "fhir-password")


def test_a_missing_relative_tls_file_is_reported_with_the_path_looked_for(tmp_path: Path) -> None:
    """The problem quotes the resolved path, so the operator sees where the bridge looked."""
    config_file = tmp_path / "pacs-bridge.yaml"
    config_file.write_text(MINIMAL_YAML + "dicom:\n  tls: {certificate: dicom.crt, private_key: dicom.key}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(config_file)

    assert f"at 'dicom.tls.certificate': no readable file at '{tmp_path / 'dicom.crt'}'" in caught.value.problems


def encrypted_copy(key_pem: Path, path: Path) -> Path:
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    encryption = serialization.BestAvailableEncryption(b"passphrase")
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


@pytest.mark.parametrize("problem", ["not PEM", "another certificate's key", "key with a passphrase", "CA not PEM"])
def test_dicom_tls_files_that_cannot_be_loaded_are_named_by_check_config(tmp_path: Path, problem: str) -> None:
    """Files that exist but are not a certificate with its unencrypted key (or CA certificates) are a problem of
    the configuration, naming the keys and files, not a start that fails on OpenSSL's words alone (nor one that
    asks for a passphrase on a terminal no one watches)."""
    pki = make_pki(tmp_path / "pki")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")
    certificate, key, ca = pki.server_cert_pem, pki.server_key_pem, pki.ca_pem
    if problem == "not PEM":
        certificate = junk
    elif problem == "another certificate's key":
        key = pki.client_key_pem
    elif problem == "key with a passphrase":
        key = encrypted_copy(pki.server_key_pem, tmp_path / "encrypted.key")
    else:
        ca = junk
    config_file = tmp_path / "pacs-bridge.yaml"
    config_file.write_text(
        MINIMAL_YAML + f"dicom:\n  tls: {{certificate: '{certificate}', private_key: '{key}', client_ca: '{ca}'}}\n",
        encoding="utf-8",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(config_file)

    (message,) = caught.value.problems
    assert message.startswith("at 'dicom.tls': ")
    if problem == "CA not PEM":
        assert f"client_ca '{junk}' cannot be loaded as PEM CA certificates" in message
    else:
        assert f"certificate '{certificate}' and private_key '{key}' cannot be loaded" in message


def test_dicom_tls_files_that_load_are_accepted(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config_file = tmp_path / "pacs-bridge.yaml"
    config_file.write_text(
        MINIMAL_YAML + f"dicom:\n  tls: {{certificate: '{pki.server_cert_pem}', private_key: '{pki.server_key_pem}', "
        f"client_ca: '{pki.ca_pem}'}}\n",
        encoding="utf-8",
    )

    assert load_config(config_file).dicom.tls.enabled


def test_empty_file_keys_stay_empty(tmp_path: Path) -> None:
    """An empty path means 'none' (e.g. no CA bundle) and is not turned into the directory itself."""
    config_file = tmp_path / "pacs-bridge.yaml"
    config_file.write_text(MINIMAL_YAML + "  tls: {ca_bundle: ''}\n", encoding="utf-8")

    assert load_config(config_file).fhir.tls.ca_bundle == ""
