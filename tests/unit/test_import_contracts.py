"""The layers contract of .importlinter names every module of pacs_bridge, so that `lint-imports` (.ci/run) checks
each one: a new module left out of it would be free to import anything."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pacs_bridge"


def layer_modules() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"]
    names = (name.strip() for line in layers.splitlines() for name in re.split(r"[|:]", line))
    return {name for name in names if name}


def package_modules() -> set[str]:
    """Every module with code: each .py file, a package by its __init__.py unless that is empty or a docstring."""
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            text = path.read_text(encoding="utf-8").strip()
            if not text or (text.startswith('"""') and text.endswith('"""') and text.count('"""') == 2):
                continue
            parts = parts[:-1]
        modules.add(".".join(parts))
    return modules


def covered(module: str, named: set[str]) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in named)


def test_every_module_of_the_package_is_in_a_layer() -> None:
    named = layer_modules()
    missing = sorted(module for module in package_modules() if not covered(module, named) and module != "pacs_bridge")
    assert missing == [], f"add these modules to a layer of .importlinter (docs/architecture.md says which): {missing}"


def test_every_module_the_layers_name_exists() -> None:
    modules = package_modules()
    unknown = sorted(
        name
        for name in layer_modules()
        if not covered(name, modules) and not any(module.startswith(f"{name}.") for module in modules)
    )
    assert unknown == []
