"""The systemd unit as systemd itself reads it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "pacs-bridge.service"


def test_systemd_analyze_accepts_the_unit(tmp_path: Path):
    """systemd-analyze verify finds nothing wrong (ExecStart pointed at this environment's console script)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing; run: apt-get install -y systemd")
    script = shutil.which("pacs-bridge") or str(Path(sys.executable).parent / "pacs-bridge")
    unit = tmp_path / "pacs-bridge.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/pacs-bridge", script), encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pacs-bridge.service" not in result.stderr, result.stderr


def test_every_hardening_line_of_the_unit_is_explained():
    """In the hardening part of [Service], every block of directives opens with a comment saying why."""
    lines = UNIT.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# --- Hardening"))
    end = next(i for i, line in enumerate(lines) if line.startswith("[Install]"))
    explained = False
    directives = 0
    for line in lines[start + 1 : end]:
        if not line.strip():
            explained = False
        elif line.startswith("#"):
            explained = True
        else:
            directives += 1
            assert explained, f"unexplained directive: {line}"
    assert directives >= 10
