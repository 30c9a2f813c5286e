"""Command line: ``pacs-bridge run | check-config | migrate | status | retry | republish | reconcile | backfill``.

The only module that calls ``sys.exit``. Exit status: 0 success, 1 runtime failure (database, port, FHIR
server; a backfill with failed windows or studies), 2 invalid configuration or arguments, 3 discrepancies
that reconcile found and did not repair, 4 a backfill stopped by SIGINT/SIGTERM before its end.

Every command reads its configuration from ``--config``, else ``$PACS_BRIDGE_CONFIG``, else
``/etc/pacs-bridge/pacs-bridge.yaml``, and says which file it used: ``run`` in its ``configuration_loaded``
log line (on stderr, before the error, when the file cannot be loaded: there is no log yet), the other commands
on stderr (their stdout stays theirs, e.g. ``status --json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from pacs_bridge import __version__
from pacs_bridge.config import Config, config_warnings, load_config
from pacs_bridge.errors import ConfigError, PacsBridgeError
from pacs_bridge.redaction import redact_url, redact_urls

EXIT_CONFIG_ERROR = 2
EXIT_RUNTIME_ERROR = 1
EXIT_DISCREPANCIES = 3  # reconcile found differences it did not repair
EXIT_STOPPED = 4  # a backfill stopped before its end; the same command continues it

CONFIG_VARIABLE = "PACS_BRIDGE_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/pacs-bridge/pacs-bridge.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigChoice:
    """The configuration file a command reads, and what chose it."""

    path: str
    source: str  # "--config", "PACS_BRIDGE_CONFIG" or "default"

    @property
    def described(self) -> str:
        """Where the path came from, as the operator reads it."""
        if self.source == "default":
            return f"the default path; neither --config nor {CONFIG_VARIABLE} is set"
        return f"from {self.source}"


def choose_config(argument: str | None, environ: Mapping[str, str]) -> ConfigChoice:
    """``--config`` when given, else ``$PACS_BRIDGE_CONFIG`` when set and not empty, else the default path."""
    if argument is not None:
        return ConfigChoice(path=argument, source="--config")
    from_environment = environ.get(CONFIG_VARIABLE, "")
    if from_environment.strip():
        return ConfigChoice(path=from_environment, source=CONFIG_VARIABLE)
    return ConfigChoice(path=DEFAULT_CONFIG_PATH, source="default")


_CONFIG_HELP = (
    f"the YAML configuration file (default: ${CONFIG_VARIABLE} when set, else {DEFAULT_CONFIG_PATH}); relative "
    "paths inside it are relative to its directory"
)

# One example per command, shown by --help (the configuration comes from --config, $PACS_BRIDGE_CONFIG or the
# default path).
_EXAMPLES = {
    "run": """\
examples:
  pacs-bridge run --config config/pacs-bridge.example.yaml   # in the foreground, from a clone
  pacs-bridge run                  # /etc/pacs-bridge/pacs-bridge.yaml (systemd: deploy/pacs-bridge.service)

The bridge logs configuration_loaded (which file), listener_started and bridge_started once it serves;
SIGTERM or Ctrl-C stop it cleanly. Exit status 1: a port taken, the database or a secret unavailable (the
message names the key to fix); 2: an invalid configuration.""",
    "check-config": """\
examples:
  pacs-bridge check-config --config /etc/pacs-bridge/pacs-bridge.yaml
  PACS_BRIDGE_CONFIG=config/pacs-bridge.example.yaml pacs-bridge check-config --online

Every problem is listed with its key path; exit status 2 when the file is invalid, 1 when --online finds the
database or the FHIR server unusable.""",
    "migrate": """\
examples:
  sqlite3 /var/lib/pacs-bridge/pacs-bridge.db ".backup /var/backups/pacs-bridge.db"   # first, or pg_dump
  pacs-bridge migrate --config /etc/pacs-bridge/pacs-bridge.yaml

Never creates an index: with none where database.url points, it names the path it looked for and exits 1
(`pacs-bridge run` creates a new index at its first start).""",
    "status": """\
examples:
  pacs-bridge status
  pacs-bridge status --json --config /etc/pacs-bridge/pacs-bridge.yaml | jq .counts

Read-only: with no index where database.url points, it names the path it looked for and exits 1.""",
    "retry": """\
examples:
  pacs-bridge retry --failed                      # after fixing the cause on the FHIR side
  pacs-bridge retry 1.2.826.0.1.3680043.8.498.1   # one study

The studies are published at the publisher's next tick, by the running bridge.""",
    "reconcile": """\
examples:
  pacs-bridge reconcile                # report only; exit status 3 when something is left to repair
  pacs-bridge reconcile --fix""",
    "republish": """\
examples:
  pacs-bridge republish --since 2024-03-15        # every study changed since that day (UTC)
  pacs-bridge republish 1.2.826.0.1.3680043.8.498.1""",
    "backfill": """\
examples:
  pacs-bridge backfill --source dicomweb --since 2024-01-01 --until 2024-12-31
  pacs-bridge backfill --source dimse --modality MR --dry-run
  pacs-bridge backfill --source dicomweb --study 1.2.826.0.1.3680043.8.498.1

Reads headers only (QIDO-RS + WADO-RS metadata, or C-FIND) from the PACS in the pacs: section and indexes
them; the running bridge publishes them. Ctrl-C or SIGTERM stops it (exit status 4): the same command
continues. Exit status 1: a window or study failed (each is listed; the same command retries them). See
docs/backfill.md.""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-bridge",
        description="DICOM C-STORE in, FHIR ImagingStudy out.",
        epilog=f"Every command reads --config FILE, else ${CONFIG_VARIABLE}, else {DEFAULT_CONFIG_PATH}. "
        "Run pacs-bridge COMMAND --help for an example.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
        return sub

    command("run", "run the DICOM listener and FHIR publisher in the foreground")
    check = command("check-config", "validate the configuration file and exit")
    check.add_argument("--online", action="store_true", help="also check that the database and the FHIR server answer")
    command("migrate", "upgrade the index database schema to this version of pacs-bridge (back it up first)")
    status = command("status", "show how many studies are pending, published and failed, and why failed ones failed")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument("--limit", type=int, default=50, help="failed studies listed at most (default 50)")
    retry = command("retry", "make failed studies due again")
    retry_target = retry.add_mutually_exclusive_group(required=True)
    retry_target.add_argument("study_uid", nargs="?", help="the Study Instance UID of one failed study")
    retry_target.add_argument("--failed", action="store_true", help="every failed study")
    reconcile = command(
        "reconcile", "compare the index with the FHIR server: missing, stale or duplicate ImagingStudy resources"
    )
    reconcile.add_argument("--fix", action="store_true", help="republish missing and stale studies, delete duplicates")
    republish = command("republish", "rebuild and send studies even if unchanged")
    republish_target = republish.add_mutually_exclusive_group(required=True)
    republish_target.add_argument("study_uid", nargs="?", help="the Study Instance UID of one study")
    republish_target.add_argument(
        "--since", type=_parse_since, metavar="DATE", help="every study changed on or after DATE (YYYY-MM-DD, UTC)"
    )
    backfill = command(
        "backfill", "index the studies a PACS already holds, from their headers only; the service publishes them"
    )
    backfill.add_argument(
        "--source", required=True, choices=("dicomweb", "dimse"), help="pacs.dicomweb_url or pacs.dimse"
    )
    backfill.add_argument(
        "--since", type=_parse_date, metavar="DATE", help="first StudyDate (YYYY-MM-DD; default 1900-01-01)"
    )
    backfill.add_argument(
        "--until", type=_parse_date, metavar="DATE", help="last StudyDate (YYYY-MM-DD; default today)"
    )
    backfill.add_argument(
        "--modality", type=_parse_modality, metavar="M", help="only studies with a series of modality M"
    )
    backfill.add_argument("--study", type=_parse_uid, metavar="UID", help="only the study with this Study Instance UID")
    backfill.add_argument(
        "--dry-run", action="store_true", help="ask the PACS and check what it returns; record nothing"
    )
    return parser


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a date such as 2024-03-15, got {text!r}") from exc


def _parse_modality(text: str) -> str:
    modality = text.strip().upper()
    if not re.fullmatch(r"[A-Z0-9_]{1,16}", modality):
        raise argparse.ArgumentTypeError(f"expected a DICOM modality code such as CT or MR, got {text!r}")
    return modality


def _parse_uid(text: str) -> str:
    uid = text.strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
        raise argparse.ArgumentTypeError(f"expected a Study Instance UID (digits and dots, at most 64), got {text!r}")
    return uid


def _parse_since(text: str) -> datetime:
    try:
        if "T" in text or " " in text:
            moment = datetime.fromisoformat(text)
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return datetime.combine(date.fromisoformat(text), time(0), tzinfo=UTC)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a date such as 2024-03-15, got {text!r}") from exc


def _load(choice: ConfigChoice, *, announce: str | None = None) -> Config:
    """The configuration ``choice`` names; exits 2 saying why not (after ``announce``, the file and why that one,
    for a command that has not said it yet)."""
    try:
        return load_config(choice.path)
    except ConfigError as exc:
        if announce is not None:
            print(announce, file=sys.stderr)
        print(exc, file=sys.stderr)
        if choice.source == "default" and not os.path.exists(choice.path):
            hint = f"pacs-bridge: name the configuration file with --config FILE or {CONFIG_VARIABLE}=FILE"
            print(hint, file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return redact_urls(value) if isinstance(value, str) else value  # a last_error may quote a URL


def _status(config: Config, *, config_path: str, as_json: bool, limit: int) -> None:
    from pacs_bridge.index.backfill_progress import BackfillLedger
    from pacs_bridge.index.models import PublishState
    from pacs_bridge.wiring import open_index, utc_now

    engine, index = open_index(config, config_path=config_path)
    try:
        counts = index.count_by_state()
        oldest = index.studies_in_state(PublishState.PENDING, limit=1)
        failed = index.studies_in_state(PublishState.FAILED, limit=limit)
        backfills = BackfillLedger(engine).latest_runs(limit=3)
        relink = index.links.counts(utc_now())
    finally:
        engine.dispose()
    relink_on = config.publish.relink_seconds > 0
    if as_json:
        document = {
            "counts": asdict(counts),
            "oldest_pending": {k: _jsonable(v) for k, v in asdict(oldest[0]).items()} if oldest else None,
            "failed": [{k: _jsonable(v) for k, v in asdict(study).items()} for study in failed],
            "backfills": [_jsonable_tree(asdict(run)) for run in backfills],
            "relink": {"enabled": relink_on, **{k: _jsonable(v) for k, v in asdict(relink).items()}},
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return
    print(f"studies: {counts.pending} pending, {counts.published} published, {counts.failed} failed")
    if oldest:
        study = oldest[0]
        since = study.first_change_at.isoformat() if study.first_change_at else "?"
        due = study.due_at.isoformat() if study.due_at else "?"
        print(f"oldest pending: {study.study_uid} (waiting since {since}, due {due}, attempts {study.attempts})")
        if study.last_error:
            print(f"  last error: {redact_urls(study.last_error)}")
    if relink.patient_waiting or relink.order_waiting or not relink_on:
        print(
            f"relink: {relink.patient_waiting} published studies wait for their Patient, {relink.order_waiting} for "
            f"their ServiceRequest; "
            + (
                f"{relink.due} due now" + (f", next lookup {relink.next_at.isoformat()}" if relink.next_at else "")
                if relink_on
                else "relinking is off (publish.relink_seconds: 0)"
            )
        )
    if failed:
        print("failed:")
        for study in failed:
            print(f"  {study.study_uid}  attempts={study.attempts}  {redact_urls(study.last_error or '')}")
        if counts.failed > len(failed):
            print(f"  ... and {counts.failed - len(failed)} more (use --limit)")
    for run in backfills:
        print(f"backfill {run.run_id}: {_describe_run(run)}")
        if run.last_error and run.state != "complete":
            print(f"  last error: {run.last_error}")


def _jsonable_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable_tree(item) for key, item in value.items()}
    return value.isoformat() if isinstance(value, datetime | date) else value


def _describe_run(run: Any) -> str:
    """One backfill run on a line: what it asks, its state and counters."""
    asked = f"study {run.study_uid}" if run.study_uid else f"{run.since}..{run.until}"
    if run.modality:
        asked += f" {run.modality}"
    counts = run.counts
    progress = f", {counts.days_done}/{run.days_total} days" if run.days_total else ""
    return (
        f"{run.source} {asked}: {run.state} (updated {run.updated_at.isoformat()}){progress}, "
        f"{counts.studies_found} studies found, {counts.studies_indexed} indexed, {counts.studies_unchanged} "
        f"unchanged, {counts.failures} failed"
    )


def _request(config: Config, args: argparse.Namespace, *, config_path: str) -> None:
    from pacs_bridge.wiring import open_index, utc_now

    engine, index = open_index(config, config_path=config_path)
    try:
        if args.command == "retry":
            uids = index.retry_failed(utc_now(), study_uid=args.study_uid)
            what = "failed study" if args.study_uid is None else f"failed study {args.study_uid}"
        else:
            uids = index.republish(utc_now(), study_uid=args.study_uid, changed_since=args.since)
            what = "study" if args.study_uid is None else f"study {args.study_uid}"
    finally:
        engine.dispose()
    if args.study_uid is not None and not uids:
        print(f"pacs-bridge: no {what} in the index", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
    verb = "retried" if args.command == "retry" else "republished"
    print(f"{len(uids)} {what if args.study_uid else what + '(s)'} will be {verb} at the next tick")
    for uid in uids:
        print(f"  {uid}")


def _reconcile(config: Config, *, config_path: str, fix: bool) -> None:
    from pacs_bridge.fhir.client import FhirClient
    from pacs_bridge.reconcile import reconcile
    from pacs_bridge.wiring import mapping_settings, open_fhir_http, open_index, utc_now

    http, token_http = open_fhir_http(config)  # TLS and fhir.auth as the bridge uses them
    with http, token_http:
        engine, index = open_index(config, config_path=config_path)
        try:
            fhir = FhirClient(http, base_url=config.fhir.base_url)
            report = reconcile(index, fhir, mapping_settings(config), fix=fix, clock=utc_now)
        finally:
            engine.dispose()
    for discrepancy in report.discrepancies:
        action = {"missing": "republished", "stale": "republished", "duplicate": "deleted"}[discrepancy.kind]
        suffix = f" -> {action}" if discrepancy.fixed else ""
        print(f"{discrepancy.kind:<9} {discrepancy.study_uid}  {redact_urls(discrepancy.detail)}{suffix}")
    for line in _lookup_fallback_lines(report.lookup_fallbacks):
        print(line)
    print(
        f"{report.checked} published studies checked against {redact_url(config.fhir.base_url)}: "
        f"{len(report.discrepancies)} discrepancies, {len(report.unresolved)} unresolved"
    )
    if report.unresolved:
        print("run again with --fix to repair them", file=sys.stderr)
        sys.exit(EXIT_DISCREPANCIES)


def _lookup_fallback_lines(fallbacks: Mapping[tuple[str, str], int]) -> list[str]:
    """One line per link for the studies reconcile compared with a reference by identifier, by reason."""
    resources = {"patient": ("Patient", "subject"), "order": ("ServiceRequest", "basedOn")}
    lines = []
    for link, (resource, element) in resources.items():
        reasons = {reason: count for (name, reason), count in sorted(fallbacks.items()) if name == link}
        if reasons:
            counts = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
            lines.append(
                f"{element} by identifier for {sum(reasons.values())} studies, the {resource} lookup found none to "
                f"reference ({counts}): compared as published, not a discrepancy"
            )
    return lines


def _backfill(config: Config, args: argparse.Namespace, *, config_path: str) -> None:
    from sqlalchemy import Engine

    from pacs_bridge.backfill.command import run_backfill
    from pacs_bridge.backfill.runner import BackfillRequest
    from pacs_bridge.errors import IndexNotFoundError
    from pacs_bridge.index.repository import Index
    from pacs_bridge.logs import configure_logging
    from pacs_bridge.wiring import open_index

    until = args.until or date.today()
    if args.since and until < args.since:
        print(f"pacs-bridge: --until {until} is before --since {args.since}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    request = BackfillRequest(
        source=args.source,
        since=args.since,
        until=args.until,
        modality=args.modality or "",
        study_uid=args.study or "",
        dry_run=args.dry_run,
    )
    configure_logging(config.logging.level, config.logging.format)
    # The index the service fills: never created here, so that a wrong database.url is named, not filled. A
    # dry run only reads it, and without one compares with nothing.
    engine: Engine | None = None
    index: Index | None = None
    try:
        engine, index = open_index(config, config_path=config_path)
    except IndexNotFoundError as exc:
        if not args.dry_run:
            raise
        print(f"{exc}\ndry run: compared with no index, every study found is new", file=sys.stderr)
    try:
        summary = run_backfill(config, request, engine=engine, index=index, config_path=config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM: stopped at once, what was done is kept
        print("stopped at once; run the same command again to continue", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    finally:
        if engine is not None:
            engine.dispose()
    counts = summary.counts
    if summary.dry_run:
        changed = counts.studies_indexed - summary.new_studies
        print(
            f"backfill from {args.source} (dry run): {counts.studies_found} studies found: {summary.new_studies} "
            f"new, {changed} changed, {counts.studies_unchanged} unchanged; it would index "
            f"{counts.studies_indexed} studies ({counts.instances_indexed} instances), {len(summary.failures)} failed"
        )
    else:
        print(
            f"backfill from {args.source}: {counts.studies_found} studies found, {counts.studies_indexed} indexed "
            f"({counts.instances_indexed} instances), {counts.studies_unchanged} unchanged, "
            f"{len(summary.failures)} failed"
        )
    if summary.unreachable is not None:
        print(f"pacs-bridge: {summary.unreachable}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
    for failure in summary.failures[:50]:
        print(f"  failed: {failure.what}: {failure.error}", file=sys.stderr)
    if len(summary.failures) > 50:
        print(f"  ... and {len(summary.failures) - 50} more (the log has each)", file=sys.stderr)
    if summary.stopped:
        print("stopped before the end; run the same command again to continue", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    if summary.failures:
        print("run the same command again to retry what failed", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)


def _migrate(config: Config, *, config_path: str) -> None:
    from pacs_bridge.index.engine import make_engine
    from pacs_bridge.index.schema import prepare_schema
    from pacs_bridge.wiring import check_index_location

    check_index_location(config, config_path=config_path, create=False)
    engine = make_engine(config.database.url)
    try:
        change = prepare_schema(engine, upgrade=True, create=False, config_hint=config_path)
    finally:
        engine.dispose()
    if change.from_revision == change.to_revision:
        print(f"index schema already at revision {change.to_revision}; nothing to do")
    else:
        print(f"index schema upgraded from revision {change.from_revision} to {change.to_revision}")


def _check_online(config: Config) -> None:
    from pacs_bridge.checks import (
        CheckResult,
        check_database,
        check_fhir_server,
        check_order_search,
        check_patient_search,
    )
    from pacs_bridge.wiring import open_fhir_http

    results = [check_database(config)]
    try:
        http, token_http = open_fhir_http(config)  # TLS and fhir.auth as the bridge uses them
    except PacsBridgeError as exc:  # a secret or TLS file that cannot be read
        results.append(CheckResult(name="fhir", ok=False, detail=str(exc)))
    else:
        with http, token_http:
            results.append(check_fhir_server(config, http))
            if results[-1].ok:
                searches = (check_patient_search(config, http), check_order_search(config, http))
                results += [result for result in searches if result is not None]
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'} {result.name}: {redact_urls(result.detail)}")
    if not all(result.ok for result in results):
        sys.exit(EXIT_RUNTIME_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    choice = choose_config(args.config, os.environ)
    config_path = os.path.abspath(choice.path)
    announcement = f"pacs-bridge: configuration {config_path} ({choice.described})"
    if args.command != "run":  # run says it in its log, which stays JSON under systemd, once the file is loaded
        print(announcement, file=sys.stderr)
    config = _load(choice, announce=announcement if args.command == "run" else None)
    if args.command == "check-config":
        print(f"{choice.path}: configuration is valid")
        for warning in config_warnings(config):
            print(f"{choice.path}: warning: {redact_urls(warning)}", file=sys.stderr)
        if args.online:
            _check_online(config)
        return
    try:
        if args.command == "status":
            _status(config, config_path=config_path, as_json=args.json, limit=args.limit)
            return
        if args.command in ("retry", "republish"):
            _request(config, args, config_path=config_path)
            return
        if args.command == "reconcile":
            _reconcile(config, config_path=config_path, fix=args.fix)
            return
        if args.command == "migrate":
            _migrate(config, config_path=config_path)
            return
        if args.command == "backfill":
            _backfill(config, args, config_path=config_path)
            return
        # Imported here so that the other commands stay fast and never start the runtime stack.
        import structlog

        from pacs_bridge.logs import configure_logging
        from pacs_bridge.service import BridgeService

        configure_logging(config.logging.level, config.logging.format)
        structlog.get_logger("pacs_bridge.cli").info(
            "configuration_loaded", config_file=config_path, config_source=choice.source
        )
        for warning in config_warnings(config):
            structlog.get_logger("pacs_bridge.config").warning("config_warning", detail=warning)
        BridgeService(config, config_path=config_path).run_until_stopped()
    except PacsBridgeError as exc:
        print(f"pacs-bridge: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
    except OSError as exc:  # e.g. the DICOM port is taken or not ours to bind
        print(f"pacs-bridge: cannot start: {exc}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME_ERROR)
