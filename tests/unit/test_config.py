"""Unit tests for ``pacs_bridge.config`` (YAML -> validated Config) and the ``check-config`` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pacs_bridge.cli import EXIT_CONFIG_ERROR, main
from pacs_bridge.config import (
    Config,
    HttpConfig,
    PacsAuthConfig,
    PacsConfig,
    PacsDimseConfig,
    config_warnings,
    load_config,
    parse_config,
)
from pacs_bridge.config import listener as listener_config
from pacs_bridge.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "config" / "pacs-bridge.example.yaml"
MINIMAL: dict[str, Any] = {"fhir": {"base_url": "https://fhir.example.org/r4"}}


def problems_of(data: Any) -> tuple[str, ...]:
    """The problems parse_config reports for ``data`` (fails the test if it accepts it)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path="bridge.yaml")
    return caught.value.problems


def with_section(section: str, values: Any) -> dict[str, Any]:
    return {**MINIMAL, section: values}


def test_example_file_is_valid() -> None:
    """The shipped example configuration passes validation as it is."""
    config = load_config(EXAMPLE)

    assert config.fhir.base_url == "http://127.0.0.1:8080/fhir"
    assert [endpoint.id for endpoint in config.endpoints] == ["pacs-wado-rs"]


def _keys(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_example_file_shows_every_key_with_its_default() -> None:
    """The example documents every key, and each value it shows is the default (endpoints, patient and the
    optional http and pacs sections aside: they show a typical value)."""
    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    example = load_config(EXAMPLE)
    defaults = parse_config({"fhir": {"base_url": example.fhir.base_url}}, path="defaults", directory=EXAMPLE.parent)

    assert set(document) == _keys(Config)
    for section, model in Config.model_fields.items():
        if section == "endpoints":
            continue
        annotation = {"http": HttpConfig, "pacs": PacsConfig}.get(section, model.annotation)
        assert isinstance(annotation, type)
        assert set(document[section]) == _keys(annotation), section
    typical = {"endpoints": [], "http": None, "pacs": None, "patient": defaults.patient}
    assert example.model_copy(update=typical) == defaults
    assert example.pacs is not None
    assert set(document["pacs"]["auth"]) == _keys(PacsAuthConfig)
    assert set(document["pacs"]["dimse"]) == _keys(PacsDimseConfig)
    assert example.pacs.model_copy(update={"dicomweb_url": "", "dimse": None}) == PacsConfig()
    assert example.pacs.dimse is not None
    assert example.pacs.dimse.max_results == PacsDimseConfig.model_fields["max_results"].default


def test_example_file_references_the_patient_the_fhir_server_holds() -> None:
    """The example starts as the README does: patient.mode lookup with an identifier system (and the own issuer),
    so that ImagingStudy?patient=<id> finds the studies; check-config has nothing to warn about."""
    patient = load_config(EXAMPLE).patient

    assert (patient.mode, patient.identifier_system) == ("lookup", "urn:oid:2.16.840.1.113883.19.5")
    assert patient.issuers == {"HOSP-A": patient.identifier_system}
    assert config_warnings(load_config(EXAMPLE)) == []


def test_minimal_config_with_only_the_fhir_base_url_is_valid_with_defaults() -> None:
    """fhir.base_url is the only required key; everything else takes its documented default."""
    config = parse_config(MINIMAL, path="bridge.yaml")

    assert config.fhir.base_url == "https://fhir.example.org/r4"
    assert (config.fhir.version, config.fhir.timeout_seconds) == ("R4", 30.0)
    assert (config.dicom.ae_title, config.dicom.port, config.dicom.bind) == ("PACS_BRIDGE", 11112, "0.0.0.0")
    assert config.database.url == "sqlite:///pacs-bridge.db"
    assert (config.debounce.quiet_seconds, config.debounce.max_delay_seconds) == (30.0, 300.0)
    assert config.endpoints == []
    assert config.site.timezone == ""
    assert (config.publish.retry_base_seconds, config.publish.retry_max_seconds) == (5.0, 600.0)


def test_fhir_base_url_loses_its_trailing_slash() -> None:
    """The client appends '/ImagingStudy/...' itself, so a trailing slash is removed once here."""
    config = parse_config({"fhir": {"base_url": "https://fhir.example.org/r4/"}}, path="bridge.yaml")

    assert config.fhir.base_url == "https://fhir.example.org/r4"


@pytest.mark.parametrize(
    "data",
    [
        None,  # an empty file
        {},  # an empty mapping
        {"dicom": {"port": 104}},  # other sections but no fhir
    ],
)
def test_missing_fhir_section_is_reported_as_required(data: Any) -> None:
    """Without fhir.base_url the bridge cannot publish, and says where the key is missing."""
    assert problems_of(data) == ("at 'fhir': required key is missing",)


def test_empty_fhir_section_names_the_missing_base_url() -> None:
    """An empty fhir mapping reports the exact missing key."""
    assert problems_of({"fhir": {}}) == ("at 'fhir.base_url': required key is missing",)


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],  # a YAML list
        "fhir",  # a bare scalar
    ],
)
def test_top_level_that_is_not_a_mapping_is_one_problem(data: Any) -> None:
    """A document that is not a mapping of sections is reported as such, naming what it is."""
    (problem,) = problems_of(data)

    assert problem.startswith("expected a mapping of sections at the top level, got ")


def test_every_problem_is_listed_at_once_with_its_key_path() -> None:
    """One run lists every bad key, each with its key path, so the operator fixes the file in one go."""
    data = {
        "dicom": {"ae_title": "WAY_TOO_LONG_AE_TITLE", "port": 70000},
        "databse": {"url": "sqlite:///x.db"},
        "fhir": {"base_url": "ftp://fhir.example.org", "timout_seconds": 5},
        "debounce": {"quiet_seconds": 60, "max_delay_seconds": 10},
        "endpoints": [{"id": "pacs", "connection_type": "dicom-wado", "address": "https://pacs.example.org"}],
        "site": {"timezone": "Europe/Pariss"},
    }

    assert sorted(problems_of(data)) == sorted(
        [
            "at 'dicom.ae_title': expected 1 to 16 printable characters without backslash, got 'WAY_TOO_LONG_AE_TITLE'",
            "at 'dicom.port': Input should be less than or equal to 65535, got 70000",
            "at 'databse': unknown key; did you mean 'database'?",
            "at 'fhir.base_url': expected an http(s) URL, got 'ftp://fhir.example.org'",
            "at 'fhir.timout_seconds': unknown key; did you mean 'timeout_seconds'?",
            "at 'debounce': max_delay_seconds (10) must not be below quiet_seconds (60)",
            "at 'endpoints[0].connection_type': expected one of dicom-qido-rs, dicom-stow-rs, dicom-wado-rs, "
            "dicom-wado-uri, ihe-iid, got 'dicom-wado'",
            "at 'site.timezone': expected an IANA time zone such as Europe/Paris, got 'Europe/Pariss'",
        ]
    )


@pytest.mark.parametrize(
    ("section", "values", "key_path", "fragment"),
    [
        # a misspelt key gets the closest known key as a hint
        ("dicom", {"ae_titel": "X"}, "dicom.ae_titel", "did you mean 'ae_title'?"),
        # a key with no close match lists the keys allowed there
        (
            "dicom",
            {"colour": "red"},
            "dicom.colour",
            "known keys here: ae_title, allowed_calling_aets, association_request_timeout_seconds, bind, fast_path",
        ),
        # unknown keys inside list items are found too
        (
            "endpoints",
            [{"id": "p", "connection_type": "dicom-wado-rs", "address": "https://p.example.org", "adress": "x"}],
            "endpoints[0].adress",
            "did you mean 'address'?",
        ),
        # a URL without a scheme
        ("fhir", {"base_url": "fhir.example.org/r4"}, "fhir.base_url", "expected an http(s) URL"),
        # a URL with a scheme but no host
        ("fhir", {"base_url": "https://"}, "fhir.base_url", "expected an http(s) URL"),
        # port above the TCP range
        ("dicom", {"port": 65536}, "dicom.port", "less than or equal to 65535"),
        # negative port
        ("dicom", {"port": -1}, "dicom.port", "greater than or equal to 0"),
        # port that is not a number
        ("dicom", {"port": "dicom"}, "dicom.port", "valid integer"),
        # a negative drain time on SIGTERM
        ("dicom", {"shutdown_drain_seconds": -1}, "dicom.shutdown_drain_seconds", "greater than or equal to 0"),
        # max_delay below quiet: the study could never be quiet long enough
        ("debounce", {"quiet_seconds": 30, "max_delay_seconds": 29}, "debounce", "must not be below quiet_seconds"),
        # a connection type outside endpoint-connection-type codes we support
        (
            "endpoints",
            [{"id": "p", "connection_type": "hl7-fhir-rest", "address": "https://p.example.org"}],
            "endpoints[0].connection_type",
            "expected one of dicom-qido-rs",
        ),
        # an endpoint address with a query (WADO-URI rule: base URL only)
        (
            "endpoints",
            [{"id": "p", "connection_type": "dicom-wado-uri", "address": "https://p.example.org/wado?x=1"}],
            "endpoints[0].address",
            "must not carry a query",
        ),
        # an endpoint id that is not a FHIR id
        (
            "endpoints",
            [{"id": "pacs 1", "connection_type": "dicom-wado-rs", "address": "https://p.example.org"}],
            "endpoints[0].id",
            "expected a FHIR id",
        ),
        # a time zone name that does not exist
        ("site", {"timezone": "Mars/Olympus"}, "site.timezone", "expected an IANA time zone"),
        # a time zone value that is not even a valid key (absolute path)
        ("site", {"timezone": "/etc/localtime"}, "site.timezone", "expected an IANA time zone"),
        # AE title over 16 characters
        ("dicom", {"ae_title": "A" * 17}, "dicom.ae_title", "expected 1 to 16 printable characters"),
        # AE title with a backslash (the DICOM value separator)
        ("dicom", {"ae_title": "PACS\\1"}, "dicom.ae_title", "without backslash"),
        # AE title of spaces only
        ("dicom", {"ae_title": "   "}, "dicom.ae_title", "expected 1 to 16 printable characters"),
        # AE title with a control character
        ("dicom", {"ae_title": "PACS\t1"}, "dicom.ae_title", "expected 1 to 16 printable characters"),
        # a database URL for an engine we do not support
        ("database", {"url": "mysql://db/pacs"}, "database.url", "expected a URL such as sqlite:///PATH"),
        # a PostgreSQL URL SQLAlchemy cannot parse (a port that is not a number)
        ("database", {"url": "postgresql://db:port/pacs"}, "database.url", "not a database URL SQLAlchemy can use"),
        # a driver that is not installed
        ("database", {"url": "postgresql+nodriver://db/pacs"}, "database.url", "Can't load plugin"),
        # a FHIR version we do not produce
        ("fhir", {"base_url": "https://f.example.org", "version": "R6"}, "fhir.version", "'R4' or 'R5'"),
        # listener processes: none, too many, a word that is not auto, a number written as text
        ("dicom", {"listener_processes": 0}, "dicom.listener_processes", "expected auto or a whole number"),
        ("dicom", {"listener_processes": 65}, "dicom.listener_processes", "from 1 to 64, got 65"),
        ("dicom", {"listener_processes": "cores"}, "dicom.listener_processes", "got 'cores'"),
        ("dicom", {"listener_processes": "2"}, "dicom.listener_processes", "got '2'"),
    ],
)
def test_each_bad_value_is_reported_at_its_key_path(section: str, values: Any, key_path: str, fragment: str) -> None:
    """Each kind of problem is reported once, at the key path of the offending value, saying what is wrong."""
    (problem,) = problems_of(with_section(section, values))

    assert problem.startswith(f"at '{key_path}': ")
    assert fragment in problem


def test_ae_title_padding_is_stripped() -> None:
    """Spaces around an AE title are DICOM padding, not part of the title."""
    config = parse_config(with_section("dicom", {"ae_title": " BRIDGE "}), path="bridge.yaml")

    assert config.dicom.ae_title == "BRIDGE"


def test_duplicate_endpoint_ids_are_reported() -> None:
    """Two endpoints with one id would overwrite each other's Endpoint resource; the id is named."""
    endpoint = {"id": "pacs", "connection_type": "dicom-wado-rs", "address": "https://p.example.org"}

    (problem,) = problems_of(with_section("endpoints", [endpoint, {**endpoint, "connection_type": "dicom-wado-uri"}]))

    assert "endpoint ids must be unique; repeated: pacs" in problem


def test_duplicate_endpoint_ids_are_reported_at_the_endpoints_key() -> None:
    """Like every other problem, the duplicate id names its key path."""
    endpoint = {"id": "pacs", "connection_type": "dicom-wado-rs", "address": "https://p.example.org"}

    (problem,) = problems_of(with_section("endpoints", [endpoint, endpoint]))

    assert problem.startswith("at 'endpoints")


def test_duplicate_endpoint_ids_are_reported_together_with_other_problems() -> None:
    """'Every problem at once' includes the duplicate ids when another key is also wrong."""
    endpoint = {"id": "pacs", "connection_type": "dicom-wado-rs", "address": "https://p.example.org"}
    data = {"fhir": {"base_url": "ftp://f.example.org"}, "endpoints": [endpoint, endpoint]}

    problems = problems_of(data)

    assert len(problems) == 2
    assert any("repeated: pacs" in problem for problem in problems)


def test_config_error_message_names_the_file_on_every_line() -> None:
    """str(ConfigError) gives 'FILE: at KEY: problem' lines, ready for the terminal."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"fhir": {"base_url": "ftp://f"}, "dicom": {"port": -1}}, path="/etc/pacs-bridge.yaml")

    lines = str(caught.value).splitlines()
    assert lines[0] == "2 problem(s) in configuration file /etc/pacs-bridge.yaml:"
    assert all(line.startswith("/etc/pacs-bridge.yaml: at '") for line in lines[1:])
    assert caught.value.path == "/etc/pacs-bridge.yaml"


def test_unreadable_file_gives_a_config_error_naming_the_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the file and the OS reason, not a traceback."""
    missing = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(missing)

    assert caught.value.path == str(missing)
    assert caught.value.problems == ("cannot read the file: No such file or directory",)


def test_directory_instead_of_file_gives_a_config_error_naming_it(tmp_path: Path) -> None:
    """Pointing --config at a directory is reported like any unreadable file."""
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)

    assert caught.value.path == str(tmp_path)
    assert caught.value.problems[0].startswith("cannot read the file: ")


@pytest.mark.parametrize(
    "text",
    [
        "fhir: [unclosed\n",  # an unterminated flow sequence
        "fhir:\n\tbase_url: http://f\n",  # a tab used for indentation
        "fhir: {base_url: http://f}\n  dicom: 1\n",  # bad indentation after a complete mapping
    ],
)
def test_invalid_yaml_gives_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    """A YAML syntax error is a ConfigError naming the file, with the parser's position in the text (more in
    test_config_file.py)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.path == str(path)
    (problem,) = caught.value.problems
    assert problem.startswith("not valid YAML at line ")


def test_file_that_is_not_utf8_gives_a_config_error_naming_the_file(tmp_path: Path) -> None:
    """A file saved in Latin-1 by an editor is reported like any unreadable file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"fhir:\n  base_url: http://f.example.org\n# Cl\xe9ment\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.path == str(path)


def test_check_config_on_a_bad_file_exits_2_printing_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config exits with status 2 and prints one 'FILE: at KEY: problem' line per problem on stderr."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "fhir:\n  base_url: ftp://f.example.org\ndicom:\n  port: 70000\n  ae_titel: X\n",
        encoding="utf-8",
    )

    with pytest.raises(SystemExit) as caught:
        main(["check-config", "--config", str(path)])

    assert caught.value.code == EXIT_CONFIG_ERROR == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: at 'fhir.base_url': expected an http(s) URL, got 'ftp://f.example.org'" in err
    assert f"{path}: at 'dicom.port': Input should be less than or equal to 65535, got 70000" in err
    assert f"{path}: at 'dicom.ae_titel': unknown key; did you mean 'ae_title'?" in err


def test_check_config_on_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist is a configuration error too (exit 2), with the path on stderr."""
    missing = tmp_path / "absent.yaml"

    with pytest.raises(SystemExit) as caught:
        main(["check-config", "--config", str(missing)])

    assert caught.value.code == 2
    assert f"{missing}: cannot read the file" in capsys.readouterr().err


def test_check_config_on_the_example_prints_valid(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config returns normally on the example and says the file is valid on stdout (stderr names the file
    read and why that one)."""
    main(["check-config", "--config", str(EXAMPLE)])

    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: configuration is valid\n"
    assert err == f"pacs-bridge: configuration {EXAMPLE} (from --config)\n"


SECRET_URL_ROWS = [
    # (section, values, key path): each holds the password "s3cret" in a URL the problem quotes
    ("database", {"url": "mysql://bridge:s3cret@db/pacs"}, "database.url"),  # an engine we do not support
    ("database", {"url": "postgresql://bridge:s3cret@db:port/pacs"}, "database.url"),  # SQLAlchemy cannot parse it
    ("database", {"url": "postgresql+nodriver://bridge:s3cret@db/pacs"}, "database.url"),  # no such driver
    ("fhir", {"base_url": "ftp://bridge:s3cret@f.example.org/fhir"}, "fhir.base_url"),  # not http(s)
    (
        "endpoints",
        [{"id": "p", "connection_type": "dicom-wado-rs", "address": "https://u:s3cret@p.example.org/?x=1"}],
        "endpoints[0].address",
    ),  # a query where none may be
]


@pytest.mark.parametrize(("section", "values", "key_path"), SECRET_URL_ROWS)
def test_a_bad_url_is_quoted_without_its_password(section: str, values: Any, key_path: str) -> None:
    """The problem names the key and quotes the URL with its userinfo replaced by ***, never the password."""
    with pytest.raises(ConfigError) as caught:
        parse_config(with_section(section, values), path="bridge.yaml")

    (problem,) = caught.value.problems
    assert problem.startswith(f"at '{key_path}': ") and "://***@" in problem
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("cores", "processes"), [(1, 1), (2, 2), (16, 2)])
def test_listener_processes_auto_is_one_per_usable_core_up_to_two(
    cores: int, processes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default, auto: one listener process on a 1-core box (or a service pinned to one core), two on more."""
    monkeypatch.setattr(listener_config, "usable_cpu_cores", lambda: cores)
    config = parse_config(MINIMAL, path="bridge.yaml")

    assert config.dicom.listener_processes == "auto"
    assert config.dicom.listener_process_count == processes


def test_listener_processes_set_to_a_number_is_that_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener_config, "usable_cpu_cores", lambda: 16)
    config = parse_config(with_section("dicom", {"listener_processes": 3}), path="bridge.yaml")

    assert config.dicom.listener_process_count == 3


def test_usable_cores_follow_the_affinity_mask() -> None:
    """A service confined to some cores (systemd's CPUAffinity=, a container's cpuset) counts only those."""
    assert listener_config.usable_cpu_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("listener_processes", "max_associations", "processes"), [("auto", 1, 1), (4, 3, 3)])
def test_there_are_never_more_listener_processes_than_associations(
    listener_processes: int | str, max_associations: int, processes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each listener process serves a share of max_associations: one with no share would serve nothing."""
    monkeypatch.setattr(listener_config, "usable_cpu_cores", lambda: 16)
    dicom = {"listener_processes": listener_processes, "max_associations": max_associations}
    config = parse_config(with_section("dicom", dicom), path="bridge.yaml")

    assert config.dicom.listener_process_count == processes
