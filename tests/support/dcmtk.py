"""Find and run DCMTK's tools (the modality nobody here wrote).

pynetdicom installs console scripts of its own named ``storescu`` and ``echoscu``, which may come first on
PATH; these helpers pick the binary that identifies itself as DCMTK.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@functools.cache
def dcmtk_tool(name: str) -> str | None:
    """Absolute path of DCMTK's ``name`` (e.g. ``storescu``), or None when DCMTK is not installed."""
    candidates = [Path(d) / name for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    candidates.append(Path("/usr/bin") / name)
    for candidate in candidates:
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            result = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (result.stdout + result.stderr).lower():
            return str(candidate)
    return None


def require_dcmtk(name: str) -> str:
    """DCMTK's ``name``; fails the test (CI installs DCMTK) with the install command when it is missing."""
    path = dcmtk_tool(name) or shutil.which(name)
    if dcmtk_tool(name) is None:
        pytest.fail(f"DCMTK's {name} is not installed (found {path!r}); run: apt-get install -y dcmtk")
    return str(dcmtk_tool(name))


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK: Debian's build leaves Nagle on, stalling every C-STORE ~80 ms without this."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    files: list[Path] | Path,
    *,
    called_ae: str = "PACS_BRIDGE",
    calling_ae: str = "MODALITY",
    timeout: float = 300,
    extra_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` (or a directory, recursively) with DCMTK storescu (verbose) to 127.0.0.1:``port``."""
    args = [require_dcmtk("storescu"), "-v", "-aec", called_ae, "-aet", calling_ae, *extra_args]
    if isinstance(files, Path) and files.is_dir():
        args += ["+sd", "+r", "127.0.0.1", str(port), str(files)]
    else:
        paths = [files] if isinstance(files, Path) else files
        args += ["127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False)


def echoscu(port: int, *, called_ae: str = "PACS_BRIDGE", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    args = [require_dcmtk("echoscu"), "-aec", called_ae, "127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False)
