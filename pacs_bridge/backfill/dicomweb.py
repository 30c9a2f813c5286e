"""The DICOMweb side of a backfill, over an injected ``httpx.Client``: QIDO-RS lists the studies of a window,
WADO-RS ``/studies/{uid}/metadata`` gives the headers of its instances as DICOM JSON.

Nothing else is ever requested: no frames, no bulk data (an element given by ``BulkDataURI`` is left out),
no rendered images, no whole instances. Every answer is bounded: ``timeout`` per request (the client's),
``max_response_bytes`` per body, and it must be a JSON array of DICOM JSON objects. A 429 or 503 is waited
out (its ``Retry-After``, else 1, 2, 4 ... s) and asked again, at most ``max_attempts`` times in all; so is
a refused or dropped connection once the PACS has answered. Before it has answered anything, a connection
refused (or not made in time) means the URL or the PACS is wrong: ``PacsUnreachableError`` at once, and so
after ``UNREACHABLE_AFTER`` requests in a row whose attempts all failed to connect. A timeout waiting for an
answer is not retried: a PACS that slow is not asked again at once.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydicom.dataset import Dataset

from pacs_bridge.backfill.pacing import Pacer, backoff_seconds
from pacs_bridge.backfill.source import FoundStudies, StudyQuery
from pacs_bridge.dicom.extract import HEADER_TAGS
from pacs_bridge.errors import PacsQueryError, PacsUnreachableError
from pacs_bridge.fhir.auth import SecretAuth
from pacs_bridge.fhir.client import parse_retry_after

DICOM_JSON = "application/dicom+json"
STUDY_INSTANCE_UID_TAG = "0020000D"
# The DICOM JSON keys (tags as 8 hex digits) of the elements dicom/extract.py reads.
HEADER_JSON_KEYS = frozenset(f"{tag:08X}" for tag in HEADER_TAGS)
BUSY_STATUSES = frozenset({429, 503})
MAX_DETAIL_CHARS = 300
# Requests in a row that could not connect, once the PACS had answered, after which it is taken for gone.
UNREACHABLE_AFTER = 3


class _ConnectionLostError(Exception):
    """Internal: the connection failed before an answer came; ``error`` is what to raise if it keeps failing,
    ``reason`` what failed (``ConnectError: ...``)."""

    def __init__(self, error: PacsQueryError, reason: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.reason = reason


class DicomWebSource:
    """Studies and instance headers from a DICOMweb server (``pacs.dicomweb_url``)."""

    name = "dicomweb"

    def __init__(
        self,
        http: httpx.Client,
        *,
        base_url: str,
        pacer: Pacer,
        page_size: int = 100,
        max_response_bytes: int = 256 * 1024 * 1024,
        max_attempts: int = 5,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._pacer = pacer
        self._page_size = page_size
        self._max_response_bytes = max_response_bytes
        self._max_attempts = max_attempts
        self._ever_answered = False
        self._unconnected_requests = 0  # in a row, each after its attempts
        self.requests_sent = 0

    def close(self) -> None:
        self._http.close()

    # ---- QIDO-RS ----------------------------------------------------------------------------------------------

    def find_studies(self, query: StudyQuery, *, whole: bool) -> FoundStudies:
        params: dict[str, str | int] = {}
        if query.window is not None:
            params["StudyDate"] = query.window.dicom_range()
        if query.study_times is not None:
            params["StudyTime"] = query.study_times.dicom_range()
        if query.modality:
            params["ModalitiesInStudy"] = query.modality
        if query.study_uid:
            params["StudyInstanceUID"] = query.study_uid
        what = query.describe()
        uids: list[str] = []
        offset = 0
        while True:
            page, headers = self._get_json_array(
                f"{self._base_url}/studies", what=what, params={**params, "limit": self._page_size, "offset": offset}
            )
            uids.extend(_study_uid(item, what=what) for item in page)
            if not page:
                return FoundStudies(study_uids=tuple(dict.fromkeys(uids)), full=False)
            if len(page) < self._page_size and not more_results_warned(headers):
                return FoundStudies(study_uids=tuple(dict.fromkeys(uids)), full=False)
            if not whole:
                return FoundStudies(study_uids=tuple(dict.fromkeys(uids)), full=True)
            offset += len(page)

    # ---- WADO-RS metadata ----------------------------------------------------------------------------------------

    def study_instances(self, study_uid: str) -> list[Dataset]:
        what = f"study {study_uid}"
        items, _ = self._get_json_array(f"{self._base_url}/studies/{quote(study_uid, safe='')}/metadata", what=what)
        datasets = []
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise PacsQueryError(
                    f"{what}: WADO-RS metadata item {position} is a JSON {type(item).__name__}, not a DICOM JSON "
                    "object; the PACS's DICOMweb service answered garbage"
                )
            # Only the elements extract_instance reads are converted (sequences whole): a CT header has a
            # hundred others that would cost time and memory for nothing. One given by BulkDataURI instead of
            # its value counts as absent: it is never fetched. No bulk data handler is passed, since pydicom
            # inspects its signature for every element (a third of the conversion's time).
            wanted = {
                key: value
                for key, value in item.items()
                if key.upper() in HEADER_JSON_KEYS and not (isinstance(value, dict) and "BulkDataURI" in value)
            }
            try:
                datasets.append(Dataset.from_json(wanted))
            except Exception as exc:  # pydicom raises assorted types for malformed DICOM JSON
                # Its message may quote the value (a patient's name or ID): only its type is reported.
                raise PacsQueryError(
                    f"{what}: WADO-RS metadata item {position} is not valid DICOM JSON ({type(exc).__name__}); "
                    "the PACS's DICOMweb service answered garbage"
                ) from exc
        return datasets

    # ---- one bounded exchange ------------------------------------------------------------------------------------

    def _get_json_array(
        self, url: str, *, what: str, params: dict[str, str | int] | None = None
    ) -> tuple[list[Any], httpx.Headers]:
        """The JSON array a GET answers (empty for 204 No Content) and the answer's headers, after waiting out
        429/503."""
        attempt = 0
        while True:
            attempt += 1
            self._pacer.wait_turn()
            try:
                status, headers, body = self._get(url, what=what, params=params)
            except _ConnectionLostError as exc:
                if not self._ever_answered:
                    raise PacsUnreachableError(
                        f"cannot reach the PACS at {self._base_url} ({exc.reason}); check pacs.dicomweb_url and that "
                        "the PACS runs. Nothing was asked of it; the same command continues once it answers"
                    ) from exc.__cause__
                if attempt >= self._max_attempts:
                    self._unconnected_requests += 1
                    if self._unconnected_requests >= UNREACHABLE_AFTER:
                        raise PacsUnreachableError(
                            f"the PACS at {self._base_url} stopped answering: {self._unconnected_requests} requests in "
                            f"a row could not connect, {attempt} attempts each ({exc.reason}); check that the PACS "
                            "runs; the same command continues once it answers"
                        ) from exc.__cause__
                    raise exc.error from exc.__cause__
                self._pacer.pause(backoff_seconds(attempt))
                continue
            self._ever_answered = True
            self._unconnected_requests = 0
            if status in BUSY_STATUSES and attempt < self._max_attempts:
                wait = parse_retry_after(headers.get("Retry-After"), now=datetime.now(UTC))
                self._pacer.pause(wait if wait is not None else backoff_seconds(attempt))
                continue
            break
        if status == 204:
            return [], headers
        if not 200 <= status < 300:
            detail = body[:MAX_DETAIL_CHARS].decode("utf-8", errors="replace").strip()
            if isinstance(self._http.auth, SecretAuth):  # a careless server may echo the credentials
                detail = self._http.auth.redact(detail)
            if status in BUSY_STATUSES:
                advice = f"; still busy after {attempt} attempts, lower pacs.max_requests_per_second"
            elif status in (401, 403):
                advice = "; check pacs.auth (the mode, and the secret its *_env or *_file names)"
            else:
                advice = ""
            raise PacsQueryError(f"{what}: the PACS answered HTTP {status} to GET {url}: {detail!r}{advice}")
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in (DICOM_JSON, "application/json"):
            raise PacsQueryError(
                f"{what}: the PACS answered {content_type or 'no content type'} to GET {url}, not {DICOM_JSON}"
            )
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PacsQueryError(f"{what}: the PACS's answer to GET {url} is not JSON ({exc})") from exc
        if not isinstance(document, list):
            raise PacsQueryError(
                f"{what}: the PACS's answer to GET {url} is a JSON {type(document).__name__}, not an array"
            )
        return document, headers

    def _get(self, url: str, *, what: str, params: dict[str, str | int] | None) -> tuple[int, httpx.Headers, bytes]:
        """One GET: status, headers, and the body read up to ``max_response_bytes``."""
        self.requests_sent += 1
        try:
            with self._http.stream("GET", url, params=params, headers={"Accept": DICOM_JSON}) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self._max_response_bytes:
                    raise self._too_large(what, url)
                chunks = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self._max_response_bytes:
                        raise self._too_large(what, url)
                    chunks.append(chunk)
                return response.status_code, response.headers, b"".join(chunks)
        except httpx.ConnectTimeout as exc:  # no connection made in time: nothing answers at that address
            raise self._connection_lost(what, url, exc) from exc
        except httpx.TimeoutException as exc:
            raise PacsQueryError(
                f"{what}: no answer to GET {url} in time ({type(exc).__name__}); the PACS is overloaded or down, "
                "or pacs.timeout_seconds is too short"
            ) from exc
        except httpx.TransportError as exc:
            # A refused or dropped connection (a kept-alive one the PACS closed meanwhile, a restart) is tried
            # again like a busy answer; the error is raised once the attempts are spent.
            raise self._connection_lost(what, url, exc) from exc

    @staticmethod
    def _connection_lost(what: str, url: str, exc: httpx.TransportError) -> _ConnectionLostError:
        reason = f"{type(exc).__name__}: {exc}"
        return _ConnectionLostError(
            PacsQueryError(
                f"{what}: cannot reach the PACS for GET {url} ({reason}); check pacs.dicomweb_url and that the PACS "
                "runs"
            ),
            reason,
        )

    def _too_large(self, what: str, url: str) -> PacsQueryError:
        megabytes = self._max_response_bytes / (1024 * 1024)
        return PacsQueryError(
            f"{what}: the answer to GET {url} is over {megabytes:g} MiB; raise pacs.max_response_megabytes if "
            "the study is that large"
        )


def more_results_warned(headers: httpx.Headers) -> bool:
    """Whether a QIDO-RS answer says it was cut short: PS3.18 has the origin server add ``Warning: 299 ...``
    when "the number of results exceeded the maximum supported by the server" (a page shorter than ``limit``
    is then not the last)."""
    return any(value.strip().startswith("299") and "result" in value.lower() for value in headers.get_list("Warning"))


def _study_uid(item: Any, *, what: str) -> str:
    """The Study Instance UID of one QIDO-RS result."""
    element = item.get(STUDY_INSTANCE_UID_TAG) if isinstance(item, dict) else None
    value = element.get("Value") if isinstance(element, dict) else None
    uid = value[0] if isinstance(value, list) and value else None
    if not isinstance(uid, str) or not uid:
        raise PacsQueryError(
            f"{what}: a QIDO-RS result has no StudyInstanceUID (0020,000D): {json.dumps(item)[:MAX_DETAIL_CHARS]}"
        )
    return uid
