"""The configuration file as a file: YAML mistakes reported where they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_bridge.config import load_config
from pacs_bridge.errors import ConfigError

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
        # a tab used for indentation
        ("fhir:\n\tbase_url: http://f\n", "line 2, column 1", ("cannot start any token", "spaces, not tabs")),
        # a value holding ': ' without quotes
        ("fhir:\n  base_url: a: b\n", "line 2, column 14", ("mapping values are not allowed here", "quote a value")),
        # a quote never closed: reported where the file ends, naming where the quote opened
        ('fhir:\n  base_url: "http://f\n', "line 3, column 1", ("starts at line 2, column 13", "close the quote")),
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
