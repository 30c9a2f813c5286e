"""Find (``patient.mode: lookup``) or find-or-create (``create``) the Patient an ImagingStudy's subject references.

The values come from ``fhir/patient.py`` (pure); this module sends the requests through the ``FhirClient`` and
decides what the subject becomes. ``reference`` answers ``Patient/<id>`` for exactly one Patient, or ``None``
for the logical reference by identifier that ``identifier`` mode always uses:

- lookup: ``POST Patient/_search`` with ``identifier=system|value`` (in the body: the PatientID stays out of
  URLs and so out of access logs; ``publish/lookup.py``); one match is referenced, none or several fall back to
  the identifier;
- create: ``POST Patient`` with ``If-None-Exist: identifier=system|value``. The server creates the minimal
  Patient (201) or answers with the one that exists (200) without writing: an existing Patient's
  demographics are never changed. Several matches (412) fall back to the identifier, like lookup.

An identifier without a system is never searched: the same number may belong to another issuer's patient. That
is a study naming an IssuerOfPatientID that ``patient.issuers`` does not list (``patient.identifier_system``
serves only studies that name no issuer), or any study when no system is configured. Each fallback is logged as
``patient_lookup_fallback`` with the study UID and the reason (and the unmapped issuer), never with the
patient's data.
Failures raise ``PublishError`` like any publish request: network errors and 5xx are retried with backoff, a
refusal (4xx) marks the study failed with the reason.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import structlog

from pacs_bridge.errors import PublishError
from pacs_bridge.fhir.client import FhirClient
from pacs_bridge.fhir.identifier import identifier_search
from pacs_bridge.fhir.imaging_study import MappingSettings, study_patient_identifier
from pacs_bridge.fhir.patient import build_patient, if_none_exist
from pacs_bridge.fhir.resource import FhirResource
from pacs_bridge.fhir.validation import validate_resource
from pacs_bridge.publish.linking import Lookup
from pacs_bridge.publish.lookup import find_one
from pacs_bridge.records import StudyAttributes

log = structlog.get_logger("pacs_bridge.publish")


class PatientResolver:
    """Resolves the subject's Patient for ``mapping.patient_mode``; sends nothing in ``identifier`` mode."""

    def __init__(
        self,
        fhir: FhirClient,
        mapping: MappingSettings,
        *,
        validate: Callable[[FhirResource], None] | None = None,
        exclusive: Callable[[str], AbstractContextManager[None]] | None = None,
    ) -> None:
        """``validate`` raises ``PublishError`` for a Patient that must not be sent; by default the FHIR models
        of ``mapping.fhir_version`` check it. ``exclusive(name)`` holds a lock across the bridges sharing the
        index (``Index.exclusive``) around each conditional create, so two bridges publishing two studies of
        one new patient at once do not both create a Patient (servers differ in whether ``If-None-Exist`` is
        atomic); without it nothing is held."""
        self._fhir = fhir
        self._mapping = mapping
        self._validate = validate or functools.partial(validate_resource, fhir_version=mapping.fhir_version)
        self._exclusive = exclusive or (lambda _name: contextlib.nullcontext())

    def reference(self, study: StudyAttributes, *, create: bool = True) -> str | None:
        """``Patient/<id>`` for the study's patient; ``None``: subject stays a reference by identifier.

        ``create=False`` only looks the Patient up, in ``create`` mode too (reconcile checks, it never writes).
        Each fallback to the identifier is logged as ``patient_lookup_fallback``.
        """
        return self.resolve(study, create=create).reference

    def resolve(self, study: StudyAttributes, *, create: bool = True) -> Lookup:
        """``look_up``, logging each fallback to the identifier as ``patient_lookup_fallback``."""
        found = self.look_up(study, create=create)
        if found.reason:
            details: dict[str, object] = {"reason": found.reason}
            if found.issuer:
                details["issuer"] = found.issuer
            if found.matches is not None:
                details["matches"] = found.matches
            mode = self._mapping.patient_mode
            log.warning("patient_lookup_fallback", study_uid=study.study_uid, mode=mode, **details)
        return found

    def look_up(self, study: StudyAttributes, *, create: bool = True) -> Lookup:
        """What ``reference`` finds, with the search it sent and why it found no reference; logs nothing (the
        relink pass looks studies up again and again, and counts what it finds instead)."""
        mode = self._mapping.patient_mode
        if mode == "identifier":
            return Lookup(search=None)
        identifier = study_patient_identifier(study, self._mapping)
        if identifier is None:
            return Lookup(search=None, reason="no_patient_id")
        search = identifier_search(identifier)
        if search is None:
            if "assigner" in identifier:  # named an issuer the configuration does not map: never searched
                return Lookup(search=None, reason="issuer_not_mapped", issuer=str(identifier["assigner"]["display"]))
            return Lookup(search=None, reason="no_identifier_system")
        if mode == "create" and create:
            return self._find_or_create(study, identifier, search)
        return find_one(self._fhir, "Patient", search)

    def _find_or_create(self, study: StudyAttributes, identifier: FhirResource, search: str) -> Lookup:
        patient = build_patient(study, identifier)
        self._validate(patient)  # an invalid Patient is not sent: the study is marked failed with the reason
        try:
            with self._exclusive(f"create Patient {search}"):
                result = self._fhir.create(patient, if_none_exist=if_none_exist(search))
        except PublishError as exc:
            if exc.http_status == 412:  # several Patients carry the identifier: which one is not ours to choose
                return Lookup(search=search, reason="several_matches")
            raise PublishError(
                f"conditional create of the study's Patient: {exc.detail}",
                retryable=exc.retryable,
                http_status=exc.http_status,
                retry_after_seconds=exc.retry_after_seconds,
            ) from exc
        if result.http_status == 201:
            log.info("patient_created", study_uid=study.study_uid, http_status=result.http_status)
        if result.resource_id is None:  # the server did not say which Patient (200 without body or Location)
            return find_one(self._fhir, "Patient", search)
        return Lookup(search=search, reference=f"Patient/{result.resource_id}")
