"""The DIMSE side of a backfill: C-FIND (Study Root) at the study, series and image levels, over pynetdicom's
public API (``AE.associate``, ``send_c_find``, ``send_c_cancel``).

Each level asks for every return key the mapping reads (``RETURN_KEYS``); an instance's dataset is the merge
of its study's, its series' and its own identifiers, decoded with each one's Specific Character Set. What a
PACS does not return stays empty (docs/backfill.md lists what the resource then lacks).

Bounds: ``timeout_seconds`` for the association, each response and the connection; a study-level answer with
``max_results`` identifiers, or ended by the PACS with 0xFE00 (Orthanc at its ``LimitFindResults``) or
0xA700, is *full* and its window is split. A stop request (SIGINT/SIGTERM) sends C-CANCEL for the query under
way. One association is kept for the run and opened again after a failure. A PACS that accepts no association
from the first, or none ``UNREACHABLE_AFTER`` times in a row later, is unreachable: the run stops.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacs_bridge.backfill.pacing import Pacer
from pacs_bridge.backfill.source import FoundStudies, StudyQuery
from pacs_bridge.errors import BackfillStoppedError, PacsQueryError, PacsUnreachableError

FIND_MODEL = StudyRootQueryRetrieveInformationModelFind
PENDING = frozenset({0xFF00, 0xFF01})
SUCCESS = 0x0000
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700
# Associations refused (or not answered) in a row, once one was accepted, after which the PACS is taken for gone.
UNREACHABLE_AFTER = 3

# The return keys asked at each level: together, every element dicom/extract.py reads (a unit test holds
# them to extract.HEADER_KEYWORDS). Sequences are asked with an empty value (universal sequence matching).
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "TimezoneOffsetFromUTC",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyDescription",
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "ProcedureCodeSequence",
        "RequestedProcedureCodeSequence",
        "ReasonForTheRequestedProcedure",
        "ReasonForRequestedProcedureCodeSequence",
        "ModalitiesInStudy",
    ),
    "SERIES": (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "Laterality",
        "PerformingPhysicianName",
        "OperatorsName",
        "RequestAttributesSequence",
    ),
    "IMAGE": (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ImageLaterality",
        "ContentLabel",
        "DocumentTitle",
        "ConceptNameCodeSequence",
        "CurrentRequestedProcedureEvidenceSequence",
    ),
}
_SEQUENCES = frozenset(keyword for keyword in itertools.chain(*RETURN_KEYS.values()) if keyword.endswith("Sequence"))
# Elements of an identifier that describe the query, not the instance.
_QUERY_ONLY = frozenset({"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet", "ModalitiesInStudy"})


def find_identifier(level: str, **matching: str) -> Dataset:
    """A C-FIND identifier at ``level`` asking for its return keys, with ``matching`` values as match keys."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in RETURN_KEYS[level]:
        setattr(identifier, keyword, Sequence() if keyword in _SEQUENCES else "")
    for keyword, value in matching.items():
        setattr(identifier, keyword, value)
    return identifier


# The IssuerOfPatientID recorded when a PACS's C-FIND answer leaves the key out (rather than answering it
# empty): the PatientID's issuer is then unknown, and treating it as "no issuer" would put the ID in
# patient.identifier_system's namespace, a guess. As an issuer no configuration maps, the patient identifier
# goes out without a system and is never searched, linked or created (docs/mapping.md); a C-STORE or a
# DICOMweb backfill of the study that states the issuer replaces it.
PATIENT_ISSUER_NOT_RETURNED = "NOT RETURNED BY THE PACS (C-FIND)"


def with_patient_issuer_stated(study: Dataset) -> Dataset:
    """``study`` (a study-level C-FIND answer) with ``PATIENT_ISSUER_NOT_RETURNED`` as its IssuerOfPatientID
    when it has a PatientID but the PACS did not return the issuer key at all."""
    if "IssuerOfPatientID" not in study and str(study.get("PatientID", "") or "").strip():
        study.IssuerOfPatientID = PATIENT_ISSUER_NOT_RETURNED
    return study


def merged_instance(*identifiers: Dataset) -> Dataset:
    """One instance's dataset from its study's, series' and image's identifiers (later ones win), every text
    decoded with the character set of the identifier it came in."""
    merged = Dataset()
    merged.SpecificCharacterSet = "ISO_IR 192"  # the values below are decoded already
    for identifier in identifiers:
        identifier.decode()
        for element in identifier:
            if element.keyword not in _QUERY_ONLY:
                merged.add(element)
    return merged


class CFindSource:
    """Studies and instance headers from a PACS that answers C-FIND (``pacs.dimse``)."""

    name = "dimse"

    def __init__(
        self,
        *,
        calling_ae_title: str,
        called_ae_title: str,
        host: str,
        port: int,
        pacer: Pacer,
        max_results: int = 500,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._called = (host, port, called_ae_title)
        self._pacer = pacer
        self._max_results = max_results
        self._timeout = timeout_seconds
        # pynetdicom logs every C-FIND response identifier (names, patient IDs) at INFO, and our request's: its
        # documented switches turn that off, so no logging.level shows patient data.
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
        self._ae = AE(ae_title=calling_ae_title)
        self._ae.acse_timeout = timeout_seconds
        self._ae.dimse_timeout = timeout_seconds
        self._ae.network_timeout = timeout_seconds
        self._ae.connection_timeout = timeout_seconds
        self._ae.add_requested_context(FIND_MODEL)
        self._association: Any = None
        self._calling = calling_ae_title
        self._ever_associated = False
        self._failed_associations = 0  # in a row
        self._message_ids = itertools.count(1)
        # The study-level answers of the last window: study_instances takes its study's attributes from them
        # instead of asking the PACS again.
        self._study_answers: dict[str, Dataset] = {}
        self.requests_sent = 0

    def close(self) -> None:
        association, self._association = self._association, None
        if association is not None and association.is_established:
            association.release()

    # ---- queries -------------------------------------------------------------------------------------------------

    def find_studies(self, query: StudyQuery, *, whole: bool) -> FoundStudies:
        matching: dict[str, str] = {}
        if query.window is not None:
            matching["StudyDate"] = query.window.dicom_range()
        if query.study_times is not None:
            matching["StudyTime"] = query.study_times.dicom_range()
        if query.modality:
            matching["ModalitiesInStudy"] = query.modality
        if query.study_uid:
            matching["StudyInstanceUID"] = query.study_uid
        answers, ended_early = self._find(find_identifier("STUDY", **matching), what=query.describe())
        uids = []
        self._study_answers = {}
        for answer in answers:
            uid = str(answer.get("StudyInstanceUID", "") or "").strip()
            if not uid:
                raise PacsQueryError(f"{query.describe()}: a C-FIND answer has no StudyInstanceUID (0020,000D)")
            uids.append(uid)
            self._study_answers[uid] = answer
        full = ended_early or (self._max_results > 0 and len(answers) >= self._max_results)
        return FoundStudies(study_uids=tuple(dict.fromkeys(uids)), full=full)

    def study_instances(self, study_uid: str) -> list[Dataset]:
        what = f"study {study_uid}"
        study = self._study_answers.pop(study_uid, None)
        if study is None:
            studies, _ = self._find(find_identifier("STUDY", StudyInstanceUID=study_uid), what=what)
            if not studies:
                raise PacsQueryError(
                    f"{what}: the PACS no longer finds it (C-FIND at the study level answered nothing)"
                )
            study = studies[0]
        study = with_patient_issuer_stated(study)
        series_answers, ended_early = self._find(find_identifier("SERIES", StudyInstanceUID=study_uid), what=what)
        if ended_early:
            raise PacsQueryError(f"{what}: the PACS cut its list of series short (its C-FIND limit); not indexed")
        datasets: list[Dataset] = []
        for series in series_answers:
            series_uid = str(series.get("SeriesInstanceUID", "") or "").strip()
            if not series_uid:
                raise PacsQueryError(f"{what}: a series C-FIND answer has no SeriesInstanceUID (0020,000E)")
            images, ended_early = self._find(
                find_identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid),
                what=f"{what}, series {series_uid}",
            )
            if ended_early:
                raise PacsQueryError(
                    f"{what}, series {series_uid}: the PACS cut its list of instances short (its C-FIND limit); "
                    "raise the PACS's limit for image-level queries"
                )
            datasets.extend(merged_instance(study, series, image) for image in images)
        return datasets

    # ---- one C-FIND ----------------------------------------------------------------------------------------------

    def _find(self, identifier: Dataset, *, what: str) -> tuple[list[Dataset], bool]:
        """The identifiers one C-FIND answers, and whether the PACS ended it early (0xFE00 or 0xA700)."""
        self._pacer.wait_turn()
        association = self._established(what)
        message_id = next(self._message_ids) % 65535 + 1  # 1 .. 65535
        self.requests_sent += 1
        answers: list[Dataset] = []
        cancelled = False
        level = identifier.QueryRetrieveLevel
        for status, answer in association.send_c_find(identifier, FIND_MODEL, msg_id=message_id):
            if "Status" not in status:
                self._drop()
                raise PacsQueryError(
                    f"{what}: the PACS dropped the association or sent no C-FIND response within "
                    f"{self._timeout:g} s (pacs.timeout_seconds)"
                )
            code = int(status.Status)
            if code in PENDING:
                if answer is not None:
                    answers.append(answer)
                if self._pacer.stopping.is_set() and not cancelled:
                    association.send_c_cancel(message_id, query_model=FIND_MODEL)
                    cancelled = True
                continue
            if code == SUCCESS:
                return answers, False
            if cancelled:
                raise BackfillStoppedError
            if code in (CANCELLED, OUT_OF_RESOURCES):
                return answers, True
            comment = str(status.get("ErrorComment", "") or "")
            raise PacsQueryError(
                f"{what}: C-FIND at the {level} level failed with status 0x{code:04X}"
                + (f" ({comment})" if comment else "")
            )
        self._drop()
        raise PacsQueryError(f"{what}: the C-FIND at the {level} level ended without a final status")

    def _established(self, what: str) -> Any:
        if self._association is not None and self._association.is_established:
            return self._association
        host, port, called = self._called
        association = self._ae.associate(host, port, ae_title=called)
        if not association.is_established:
            self._failed_associations += 1
            reason = "rejected it" if association.is_rejected else "did not answer or aborted"
            check = (
                f"check pacs.dimse (ae_title, host, port) and that the PACS allows C-FIND from dicom.ae_title "
                f"({self._calling})"
            )
            if not self._ever_associated:
                raise PacsUnreachableError(
                    f"cannot open an association with the PACS {called}@{host}:{port}: it {reason}; {check}. "
                    "Nothing was asked of it; the same command continues once it answers"
                )
            if self._failed_associations >= UNREACHABLE_AFTER:
                raise PacsUnreachableError(
                    f"the PACS {called}@{host}:{port} {reason} {self._failed_associations} associations in a row; "
                    f"it is down or refuses us now ({check}); the same command continues once it answers"
                )
            raise PacsQueryError(
                f"{what}: cannot open an association with the PACS {called}@{host}:{port}: it {reason}; {check}"
            )
        self._ever_associated = True
        self._failed_associations = 0
        self._association = association
        return association

    def _drop(self) -> None:
        association, self._association = self._association, None
        if association is not None and association.is_established:
            association.abort()
