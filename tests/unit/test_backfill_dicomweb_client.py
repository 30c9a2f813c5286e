"""The DICOMweb client's handling of busy, garbage and oversized answers (httpx.MockTransport: retry logic and
error classification only; tests/integration/test_backfill_orthanc.py backfills from a real PACS)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from pacs_bridge.backfill.dicomweb import DicomWebSource
from pacs_bridge.backfill.pacing import Pacer, backoff_seconds
from pacs_bridge.backfill.source import StudyQuery
from pacs_bridge.errors import BackfillStoppedError, PacsQueryError

BASE = "http://pacs.test/dicom-web"
STUDY = "1.2.3.4"
QIDO_STUDY = {"0020000D": {"vr": "UI", "Value": [STUDY]}}
INSTANCE = {
    "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
    "00080018": {"vr": "UI", "Value": ["1.2.3.4.1.1"]},
    "0020000D": {"vr": "UI", "Value": [STUDY]},
    "0020000E": {"vr": "UI", "Value": ["1.2.3.4.1"]},
    "00080060": {"vr": "CS", "Value": ["CT"]},
    "7FE00010": {"vr": "OW", "BulkDataURI": f"{BASE}/studies/{STUDY}/series/1.2.3.4.1/instances/1.2.3.4.1.1/bulk"},
}


class RecordedWaits:
    """A stop event that never fires and records how long the pacer waited on it."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.stop_now = False

    def is_set(self) -> bool:
        return self.stop_now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.stop_now


def source(
    handler: Callable[[httpx.Request], httpx.Response], **kwargs: object
) -> tuple[DicomWebSource, RecordedWaits]:
    waits = RecordedWaits()
    pacer = Pacer(0, waits)  # type: ignore[arg-type]
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return DicomWebSource(client, base_url=BASE, pacer=pacer, **kwargs), waits  # type: ignore[arg-type]


def dicom_json(document: object, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(document).encode(), headers={"Content-Type": "application/dicom+json", **headers}
    )


def test_a_429_with_retry_after_is_waited_out_and_asked_again() -> None:
    """The PACS said when to come back: that long is waited, then the same request succeeds."""
    answers = [httpx.Response(429, headers={"Retry-After": "7"}), dicom_json([INSTANCE])]
    pacs, waits = source(lambda request: answers.pop(0))

    datasets = pacs.study_instances(STUDY)

    assert [ds.SOPInstanceUID for ds in datasets] == ["1.2.3.4.1.1"]
    assert waits.waits == [7.0]


def test_a_503_without_retry_after_backs_off_then_gives_up_naming_the_study() -> None:
    """Busy every time: 1, 2, 4, 8 s between the five attempts, then an error that names the study and the key."""
    pacs, waits = source(lambda request: httpx.Response(503, text="busy"), max_attempts=5)

    with pytest.raises(PacsQueryError, match=rf"study {STUDY}: the PACS answered HTTP 503 .*max_requests_per_second"):
        pacs.study_instances(STUDY)
    assert waits.waits == [backoff_seconds(n) for n in range(1, 5)] == [1.0, 2.0, 4.0, 8.0]


def test_a_stop_request_cuts_a_retry_after_wait_short() -> None:
    """SIGINT during a long Retry-After: the wait ends and the run stops, instead of sleeping it out."""
    waits = RecordedWaits()

    def busy(request: httpx.Request) -> httpx.Response:
        waits.stop_now = True  # the operator pressed Ctrl-C while the PACS was busy
        return httpx.Response(429, headers={"Retry-After": "3600"})

    pacs = DicomWebSource(httpx.Client(transport=httpx.MockTransport(busy)), base_url=BASE, pacer=Pacer(0, waits))  # type: ignore[arg-type]
    with pytest.raises(BackfillStoppedError):
        pacs.study_instances(STUDY)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        # not JSON at all
        (httpx.Response(200, content=b"<html>oops", headers={"Content-Type": "application/dicom+json"}), "is not JSON"),
        # an HTML error page with 200
        (httpx.Response(200, content=b"<html></html>", headers={"Content-Type": "text/html"}), "answered text/html"),
        # a JSON object where an array belongs
        (dicom_json({"error": "x"}), "is a JSON dict, not an array"),
        # an array of numbers
        (dicom_json([1, 2]), "metadata item 0 is a JSON int"),
        # DICOM JSON whose Value is not a list
        (dicom_json([{"00080018": {"vr": "UI", "Value": "1.2"}}]), "not valid DICOM JSON"),
        # DICOM JSON without the VR of an element the mapping reads
        (dicom_json([{"00080018": {"Value": ["1.2"]}}]), "not valid DICOM JSON"),
        # a 404 for a study the PACS listed
        (httpx.Response(404, text="no such study"), "HTTP 404"),
    ],
)
def test_garbage_metadata_is_an_error_naming_the_study(answer: httpx.Response, message: str) -> None:
    """Whatever is wrong with the answer, the error names the study and says what."""
    pacs, _ = source(lambda request: answer)

    with pytest.raises(PacsQueryError, match=f"study {STUDY}: .*{message}"):
        pacs.study_instances(STUDY)


def test_an_answer_over_the_size_cap_is_refused_naming_the_key() -> None:
    """A metadata answer larger than max_response_bytes is not read whole."""
    pacs, _ = source(lambda request: dicom_json([INSTANCE] * 50), max_response_bytes=1000)

    with pytest.raises(PacsQueryError, match=r"over 0\.000953674 MiB; raise pacs\.max_response_megabytes"):
        pacs.study_instances(STUDY)


def test_a_timeout_is_an_error_naming_the_window() -> None:
    """No answer in time: the window is named, with what the operator can look at."""

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    pacs, _ = source(timeout)
    with pytest.raises(PacsQueryError, match=r"study 9.9: no answer to GET .* pacs.timeout_seconds"):
        pacs.find_studies(StudyQuery(study_uid="9.9"), whole=True)


def test_bulk_data_is_never_fetched_from_the_metadata() -> None:
    """The pixel data's BulkDataURI stays unread: the only request is the metadata's."""
    requests: list[str] = []

    def pacs_answer(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        return dicom_json([INSTANCE])

    pacs, _ = source(pacs_answer)
    [dataset] = pacs.study_instances(STUDY)

    assert requests == [f"/dicom-web/studies/{STUDY}/metadata"]
    assert "PixelData" not in dataset  # not even converted: only the elements extract reads are
    assert dataset.SOPInstanceUID == "1.2.3.4.1.1"


def test_qido_pages_with_offset_until_a_short_page_when_asked_for_everything() -> None:
    """A single-day window is paged through with limit/offset; a 299 Warning means "more to come"."""
    pages = {
        "0": dicom_json(
            [QIDO_STUDY | {"0020000D": {"vr": "UI", "Value": ["1.1"]}}] * 1
            + [{"0020000D": {"vr": "UI", "Value": ["1.2"]}}]
        ),
        "2": dicom_json(
            [{"0020000D": {"vr": "UI", "Value": ["1.3"]}}],
            Warning='299 pacs: "The number of results exceeded the maximum supported by the server"',
        ),
        "3": dicom_json([{"0020000D": {"vr": "UI", "Value": ["1.4"]}}]),
    }
    asked: list[dict[str, str]] = []

    def qido(request: httpx.Request) -> httpx.Response:
        asked.append(dict(request.url.params))
        return pages[request.url.params["offset"]]

    pacs, _ = source(qido, page_size=2)
    found = pacs.find_studies(StudyQuery(modality="CT"), whole=True)

    assert (found.study_uids, found.full) == (("1.1", "1.2", "1.3", "1.4"), False)
    assert [(page["offset"], page["limit"], page["ModalitiesInStudy"]) for page in asked] == [
        ("0", "2", "CT"),
        ("2", "2", "CT"),
        ("3", "2", "CT"),
    ]


def test_a_full_first_page_of_a_splittable_window_says_full() -> None:
    """Not asked for everything: the first full page is reported full (the window is split instead)."""
    pacs, _ = source(
        lambda request: dicom_json([QIDO_STUDY, {"0020000D": {"vr": "UI", "Value": ["5.6"]}}]), page_size=2
    )

    found = pacs.find_studies(StudyQuery(), whole=False)

    assert (found.study_uids, found.full) == ((STUDY, "5.6"), True)
