"""Which configuration file each command reads, how it says so, and the help every command gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_bridge.cli import DEFAULT_CONFIG_PATH, ConfigChoice, choose_config, main

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "config" / "pacs-bridge.example.yaml"
COMMANDS = ("run", "check-config", "migrate", "status", "retry", "reconcile", "republish")


@pytest.mark.parametrize(
    ("argument", "environ", "expected"),
    [
        # --config wins over the variable
        ("a.yaml", {"PACS_BRIDGE_CONFIG": "b.yaml"}, ConfigChoice(path="a.yaml", source="--config")),
        # the variable when --config is absent
        (None, {"PACS_BRIDGE_CONFIG": "/srv/b.yaml"}, ConfigChoice(path="/srv/b.yaml", source="PACS_BRIDGE_CONFIG")),
        # an empty variable counts as unset
        (None, {"PACS_BRIDGE_CONFIG": " "}, ConfigChoice(path=DEFAULT_CONFIG_PATH, source="default")),
        # neither: the packaged default path
        (None, {}, ConfigChoice(path="/etc/pacs-bridge/pacs-bridge.yaml", source="default")),
    ],
)
def test_config_comes_from_the_option_else_the_variable_else_the_default_path(
    argument: str | None, environ: dict[str, str], expected: ConfigChoice
) -> None:
    """--config, else $PACS_BRIDGE_CONFIG, else /etc/pacs-bridge/pacs-bridge.yaml."""
    assert choose_config(argument, environ) == expected


def test_check_config_reads_the_file_named_by_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config the command reads $PACS_BRIDGE_CONFIG and says so on stderr."""
    monkeypatch.setenv("PACS_BRIDGE_CONFIG", str(EXAMPLE))

    main(["check-config"])

    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: configuration is valid\n"
    assert err == f"pacs-bridge: configuration {EXAMPLE} (from PACS_BRIDGE_CONFIG)\n"


def test_a_relative_config_path_is_announced_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The announced file is absolute, so an operator in another directory sees which file was read."""
    (tmp_path / "bridge.yaml").write_text("fhir:\n  base_url: http://127.0.0.1:8080/fhir\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    main(["check-config", "--config", "bridge.yaml"])

    assert capsys.readouterr().err == f"pacs-bridge: configuration {tmp_path / 'bridge.yaml'} (from --config)\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example_and_where_the_config_comes_from(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pacs-bridge COMMAND --help` ends with runnable examples and explains the configuration lookup."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])

    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "examples:" in help_text
    assert f"pacs-bridge {command}" in help_text.split("examples:", 1)[1]
    assert "PACS_BRIDGE_CONFIG" in help_text
    assert DEFAULT_CONFIG_PATH in help_text


def test_a_missing_default_config_says_how_to_name_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With neither --config nor the variable, and nothing at the default path: exit 2, naming the path tried,
    why that one, and how to name another."""
    monkeypatch.delenv("PACS_BRIDGE_CONFIG", raising=False)
    absent = tmp_path / "etc" / "pacs-bridge.yaml"
    monkeypatch.setattr("pacs_bridge.cli.DEFAULT_CONFIG_PATH", str(absent))

    with pytest.raises(SystemExit) as exited:
        main(["status"])

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"pacs-bridge: configuration {absent} (the default path; neither --config nor PACS_BRIDGE_CONFIG" in err
    assert f"{absent}: cannot read the file: No such file or directory" in err
    assert "name the configuration file with --config FILE or PACS_BRIDGE_CONFIG=FILE" in err


@pytest.mark.parametrize("command", [*COMMANDS, "backfill"])
def test_every_command_says_it_tried_the_default_path_when_nothing_is_there(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` too, which otherwise says it in its log: before the error, as no log is written yet."""
    monkeypatch.delenv("PACS_BRIDGE_CONFIG", raising=False)
    absent = tmp_path / "etc" / "pacs-bridge.yaml"
    monkeypatch.setattr("pacs_bridge.cli.DEFAULT_CONFIG_PATH", str(absent))
    arguments = {
        "retry": ["--failed"],
        "republish": ["1.2.3"],
        "backfill": ["--source", "dicomweb", "--study", "1.2.3"],
    }

    with pytest.raises(SystemExit) as exited:
        main([command, *arguments.get(command, [])])

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pacs-bridge: configuration {absent} (the default path; neither --config nor "), err
    assert f"{absent}: cannot read the file: No such file or directory" in err
