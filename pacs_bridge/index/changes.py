"""What indexing changes on a study's rows: which attributes of a received instance replace what earlier ones
recorded, and what one more indexed change writes on its study (``change_seq``, the change window, the due
time). Shared by the ingest and the rejection notes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from pacs_bridge.debounce import DebounceSettings, due_at
from pacs_bridge.index.models import PublishState
from pacs_bridge.index.statements import INSTANCE_FIELDS, SERIES_FIELDS, STUDY_FIELDS
from pacs_bridge.records import InstanceRecord, InstanceSnapshot, RecordOutcome, StudySnapshot

# Study attributes an instance may simply not carry: a presentation state or dose report made later, by
# another system, often lacks the order's codes and the physicians' names. An instance that leaves one of
# these empty does not erase what earlier instances stated; a different non-empty value still replaces it.
_KEPT_WHEN_ABSENT = frozenset(
    {
        "referring_physician",
        "reading_physicians",
        "procedure_codes",
        "reasons",
        "patient_name",
        "patient_birth_date",
        "patient_sex",
    }
)


# Attributes whose first recorded value stays: the AE that first sent a series keeps it, so a later re-send
# by another AE (a PACS forwarding what the modality sent) neither moves its endpoint nor republishes it.
_FIRST_VALUE_KEPT = frozenset({"sending_ae_title"})


# The issuer of an identifier, kept from an earlier instance while the identifier stays the same: a presentation
# state made later without IssuerOfPatientID must not turn another hospital's PatientID into one of ours (an
# identifier without issuer takes the configured system). A new PatientID or accession number takes its own
# instance's issuer, stated or not.
_ISSUER_OF = {
    "issuer_of_patient_id": "patient_id",
    "accession_issuer_local_id": "accession_number",
    "accession_issuer_universal_id": "accession_number",
}


def _kept_issuer(row: Any, attributes: object, name: str) -> bool:
    identifier = _ISSUER_OF.get(name)
    return identifier is not None and getattr(attributes, identifier) == getattr(row, identifier)


def changed(row: Any, attributes: object, names: Sequence[str]) -> dict[str, Any]:
    """The attributes whose value differs from the row's, as ``{column: new value}``."""
    return {
        name: value
        for name in names
        if (value := getattr(attributes, name)) != (recorded := getattr(row, name))
        and (value or (name not in _KEPT_WHEN_ABSENT and not _kept_issuer(row, attributes, name)))
        and not (recorded and name in _FIRST_VALUE_KEPT)
    }


def change_noted(study: Row[Any], changed_at: datetime, debounce: DebounceSettings) -> dict[str, Any]:
    """The study columns that record one more indexed change at ``changed_at`` and its new due time."""
    first_change_at = study.first_change_at
    if study.publish_state != PublishState.PENDING.value or first_change_at is None:
        first_change_at = changed_at
    values: dict[str, Any] = {
        "change_seq": study.change_seq + 1,
        "first_change_at": first_change_at,
        "last_change_at": changed_at,
        "publish_state": PublishState.PENDING.value,
        "due_at": due_at(first_change_at=first_change_at, last_change_at=changed_at, settings=debounce),
    }
    if study.publish_state == PublishState.FAILED.value:
        # A refused study gets a fresh chance when it changes.
        values.update(attempts=0, next_attempt_at=None)
    return values


def preview_outcomes(snapshot: StudySnapshot, records: Sequence[InstanceRecord]) -> list[RecordOutcome]:
    """What recording ``records``, instances of the study ``snapshot`` holds, would answer for each (see
    ``Index.preview_study``): the same comparison as recording's (``changed``), each instance seeing what those
    before it would have changed."""
    study = snapshot.attributes
    series = {item.attributes.series_uid: item.attributes for item in snapshot.series}
    instances = {instance.sop_instance_uid: instance for item in snapshot.series for instance in item.instances}
    outcomes = []
    for record in records:
        study_changes = changed(study, record.study, STUDY_FIELDS)
        study = replace(study, **study_changes)
        known_series = series.get(record.series.series_uid)
        series_changes = changed(known_series, record.series, SERIES_FIELDS) if known_series else {}
        series[record.series.series_uid] = replace(known_series, **series_changes) if known_series else record.series
        instance = instances.get(record.sop_instance_uid)
        instance_changes = changed(instance, record, INSTANCE_FIELDS) if instance else {}
        instances[record.sop_instance_uid] = InstanceSnapshot(
            **{name: getattr(record, name) for name in INSTANCE_FIELDS}
        )
        if instance is None:
            outcomes.append(RecordOutcome.NEW)
        elif study_changes or series_changes or instance_changes:
            outcomes.append(RecordOutcome.UPDATED)
        else:
            outcomes.append(RecordOutcome.UNCHANGED)
    return outcomes
