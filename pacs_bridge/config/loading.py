"""The YAML file read and validated into ``Config``: every problem reported with its key path, a did-you-mean
hint for unknown keys, YAML errors with line and column; and the warnings of a valid configuration."""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pacs_bridge.config.base import _CONFIG_DIRECTORY, _INLINE_SECRET_KEYS
from pacs_bridge.config.model import Config
from pacs_bridge.errors import ConfigError
from pacs_bridge.fhir.endpoint import IHE_IMR_CONNECTION_TYPES
from pacs_bridge.redaction import redact_urls


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (list indexes skipped)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        if inner and getattr(annotation, "__origin__", None) is list:
            model = inner[0]
        elif inner and isinstance(annotation, types.UnionType):  # an optional section: SECTION | None
            model = next((arg for arg in inner if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
        else:
            model = annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        known = sorted(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys here: {', '.join(known)}"
        return f"at '{_key_path(loc)}': unknown key{suggestion}"
    if kind == "missing":
        return f"at '{_key_path(loc)}': required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    where = _key_path(loc)
    value = error.get("input")
    if kind not in ("value_error",) and not isinstance(value, dict | list):
        message += f", got {value!r}"
    return f"at '{where}': {redact_urls(message)}"


def parse_config(data: Any, *, path: str, directory: Path | None = None) -> Config:
    """Validate an already-parsed YAML document; raises ``ConfigError`` listing every problem.

    Relative paths in it resolve against ``directory`` (the file's own directory); None leaves them as written.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, [f"expected a mapping of sections at the top level, got {type(data).__name__}"])
    data, problems = _without_inline_secrets(data)
    data, pacs_problems = _without_inline_secrets(data, "pacs")
    problems += pacs_problems
    problems += _duplicate_endpoint_ids(data.get("endpoints"))
    try:
        config = Config.model_validate(data, context={_CONFIG_DIRECTORY: directory})
    except ValidationError as exc:
        raise ConfigError(path, [_describe(error) for error in exc.errors()] + problems) from exc
    problems += _profile_problems(config)
    problems += _patient_problems(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def _profile_problems(config: Config) -> list[str]:
    """IHE IMR is an R4 profile whose ImagingStudy needs an endpoint; a viewer reaches images over WADO-RS."""
    if config.fhir.profile != "ihe-imr":
        return []
    problems = []
    if config.fhir.version != "R4":
        problems.append(
            f"at 'fhir.profile': ihe-imr is an R4 profile; set fhir.version to R4 (got {config.fhir.version})"
        )
    if not any(e.connection_type == "dicom-wado-rs" and not e.is_series_level for e in config.endpoints):
        problems.append(
            "at 'endpoints': fhir.profile ihe-imr needs a study-level endpoint (no series_modalities nor "
            "series_calling_aets) of connection_type dicom-wado-rs"
        )
    for position, endpoint in enumerate(config.endpoints):
        if not endpoint.is_series_level and endpoint.connection_type not in IHE_IMR_CONNECTION_TYPES:
            problems.append(
                f"at 'endpoints[{position}].connection_type': the IHE IMR study endpoints may only be "
                f"{' or '.join(sorted(IHE_IMR_CONNECTION_TYPES))}, got {endpoint.connection_type} (endpoint "
                f"{endpoint.id}); make it series-level or remove it"
            )
    return problems


def _patient_problems(config: Config) -> list[str]:
    """lookup and create search the server by identifier system and value: without any system configured, a
    PatientID alone could match another issuer's patient, so every study would fall back to its identifier."""
    patient = config.patient
    if patient.mode == "identifier" or patient.identifier_system or patient.issuers:
        return []
    return [
        f"at 'patient.mode': {patient.mode} searches the FHIR server by identifier system and value; set "
        "patient.identifier_system (or patient.issuers), since a PatientID alone may be another issuer's patient"
    ]


def config_warnings(config: Config) -> list[str]:
    """Valid settings that may not do what the operator expects, each naming its key (check-config prints them)."""
    warnings = []
    patient = config.patient
    if patient.mode != "identifier" and not patient.issuers:
        warnings.append(
            f"at 'patient.issuers': patient.mode {patient.mode} runs without an issuers table, so only studies "
            "that name no IssuerOfPatientID are searched (in patient.identifier_system); a study naming an issuer "
            "is referenced by identifier only, never searched, linked or created. List each IssuerOfPatientID your "
            "senders use with its system (your own issuer with patient.identifier_system's value)"
        )
    accession = config.accession
    if accession.mode == "lookup" and not accession.identifier_system and not accession.issuers:
        warnings.append(
            "at 'accession.mode': lookup searches the FHIR server's ServiceRequests by identifier system and value, "
            "and neither accession.identifier_system nor accession.issuers is set, so no accession number has a "
            "system and no order is ever looked up (an accession number alone may be another issuer's order). Set "
            "accession.identifier_system (or accession.issuers), or accession.mode: identifier"
        )
    return warnings


def _without_inline_secrets(data: dict[str, Any], section: str = "fhir") -> tuple[dict[str, Any], list[str]]:
    """``data`` without secrets written inline under ``{section}.auth``, and a problem naming each one.

    They are taken out before validation so that no error (nor its cause) ever carries their value.
    """
    fhir = data.get(section)
    if not isinstance(fhir, dict) or not isinstance(fhir.get("auth"), dict):
        return data, []
    auth: dict[str, Any] = fhir["auth"]
    problems = []
    for key, instead in _INLINE_SECRET_KEYS.items():
        if key in auth:
            where = " or ".join(f"'{name}'" for name in instead)
            problems.append(
                f"at '{section}.auth.{key}': secrets are not accepted in the configuration file; name an environment "
                f"variable or a file (readable only by the bridge's user) that holds it, with {where}"
            )
    if not problems:
        return data, []
    cleaned = {key: value for key, value in auth.items() if key not in _INLINE_SECRET_KEYS}
    return {**data, section: {**fhir, "auth": cleaned}}, problems


def _duplicate_endpoint_ids(endpoints: Any) -> list[str]:
    """Two endpoints with one id would overwrite each other's Endpoint resource: name each repeat."""
    if not isinstance(endpoints, list):
        return []
    seen: set[str] = set()
    problems = []
    for position, endpoint in enumerate(endpoints):
        endpoint_id = endpoint.get("id") if isinstance(endpoint, dict) else None
        if not isinstance(endpoint_id, str):
            continue
        if endpoint_id in seen:
            problems.append(f"at 'endpoints[{position}].id': endpoint ids must be unique; repeated: {endpoint_id}")
        seen.add(endpoint_id)
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last one
    silently, so a second ``dicom:`` section would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_at: dict[Any, yaml.Mark] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat what it merges
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_at.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
            if earlier is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} appears twice in one mapping (first at line {earlier.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


# What usually causes a YAML parser message, and what to do about it.
_YAML_HINTS = (
    ("'\\t'", "YAML indents with spaces, not tabs"),
    ("expected <block end>", "check this line's indentation against the lines above it"),
    ("mapping values are not allowed here", "quote a value that contains ': ', or check the indentation"),
    ("could not find expected ':'", "each key needs ': ' after it; check the line above too"),
    ("did not find expected key", "check this line's indentation against the lines above it"),
    ("found unexpected end of stream", "close the quote, [ or { opened earlier"),
    ("appears twice", "merge the two into one, or remove one"),
)


# A value the parser reads to its end before it finds the mistake: the error is reported where the value starts
# (where the fix goes), not where the parser gave up, maybe many lines on. (parser's context, what it is, the fix)
_UNCLOSED = {
    "while scanning a quoted scalar": ("the quoted value", "close the quote"),
    "while parsing a flow sequence": ("the [ list", "close the [ list with ]"),
    "while parsing a flow mapping": ("the { mapping", "close the { mapping with }"),
}


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error as one problem: where it is (line and column, from 1), what the parser says, the line
    itself and, for common mistakes, what to do."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"not valid YAML: {exc}"
    mark = exc.problem_mark
    problem = exc.problem or "syntax error"
    context_mark = exc.context_mark
    unclosed = _UNCLOSED.get(exc.context or "")
    if unclosed is not None and context_mark is not None and context_mark.line != mark.line:
        value, fix = unclosed
        where = f"line {context_mark.line + 1}, column {context_mark.column + 1}"
        ended = "the end of the file" if problem == "found unexpected end of stream" else f"line {mark.line + 1}"
        message = f"not valid YAML at {where}: {value} that starts here runs on to {ended} ({problem})"
        return message + _quoted_line(text, context_mark.line) + f"; {fix}"
    message = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if exc.context and context_mark is not None and context_mark.line != mark.line:
        message += f" ({exc.context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    message += _quoted_line(text, mark.line)
    hint = next((hint for pattern, hint in _YAML_HINTS if pattern in problem), None)
    return f"{message}; {hint}" if hint else message


def _quoted_line(text: str, number: int) -> str:
    """Line ``number`` (from 0) of ``text`` without its comment, as "; the line reads '...'"; "" for none."""
    lines = text.splitlines()
    line = re.sub(r"\s+#.*$", "", lines[number]) if 0 <= number < len(lines) else ""
    return f"; the line reads {line.rstrip()!r}" if line.strip() else ""


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``; relative paths in it resolve against its directory."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(name, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, [f"not UTF-8 text (byte {exc.start}); save the file as UTF-8"]) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(name, [_yaml_problem(exc, text)]) from exc
    return parse_config(data, path=name, directory=Path(path).absolute().parent)
