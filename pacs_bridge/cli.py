"""Command line: ``pacs-bridge run | check-config``. The only module that calls ``sys.exit``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pacs_bridge import __version__
from pacs_bridge.config import Config, load_config
from pacs_bridge.errors import ConfigError, PacsBridgeError

EXIT_CONFIG_ERROR = 2
EXIT_RUNTIME_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-bridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the DICOM listener and FHIR publisher in the foreground")
    run.add_argument("--config", required=True, help="path of the YAML configuration file")
    check = commands.add_parser("check-config", help="validate the configuration file and exit")
    check.add_argument("--config", required=True, help="path of the YAML configuration file")
    return parser


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    config = _load(args.config)
    if args.command == "check-config":
        print(f"{args.config}: configuration is valid")
        return
    # Imported here so that check-config stays fast and works without the runtime stack initialised.
    from pacs_bridge.logs import configure_logging
    from pacs_bridge.service import BridgeService

    configure_logging(config.logging.level, config.logging.format)
    try:
        service = BridgeService(config)
        service.run_until_stopped()
    except PacsBridgeError as exc:
        print(f"pacs-bridge: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
    except OSError as exc:  # e.g. the DICOM port is taken or not ours to bind
        print(f"pacs-bridge: cannot start: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
