"""Bad input, end to end: whatever a sender does, the bridge subprocess answers with the documented DIMSE outcome
and goes on serving. Each case is followed by a C-ECHO (DCMTK echoscu) and a good C-STORE.

Senders: pynetdicom's SCU (it can send a file's bytes as they are, truncated or garbled) and raw sockets for
what no SCU would send.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.support.bridge_process import BridgeProcess, wait_for
from tests.support.dcmtk import echoscu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import make_dataset, new_study_uid, write_file

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

NETWORK_TIMEOUT = 2.0
MAX_ASSOCIATIONS = 3


@pytest.fixture(scope="module")
def bridge(
    tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirTestServer, bridges_receive_both_ways: str
) -> Iterator[BridgeProcess]:
    """One bridge for the whole matrix (each case checks that it still serves): SQLite, 2 s network timeout,
    at most 3 associations."""
    directory = tmp_path_factory.mktemp("bad-input")
    running = BridgeProcess(
        directory,
        database_url=f"sqlite:///{directory / 'bridge.db'}",
        fhir_base_url=fhir_server.base_url,
        extra={"dicom": {"network_timeout_seconds": NETWORK_TIMEOUT, "max_associations": MAX_ASSOCIATIONS}},
    )
    try:
        yield running.start()
    finally:
        running.close()


@pytest.fixture
def send_raw_files() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes as they are on disk instead of decoding and re-encoding them."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def associate(port: int, *contexts: Any) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    for context in contexts or (build_context(CTImageStorage, [ExplicitVRLittleEndian]),):
        ae.requested_contexts.append(context)
    return ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")


def store(port: int, dataset: Dataset | Path) -> int:
    """One C-STORE on its own association; the status, or -1 when no response came."""
    assoc = associate(port)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    return int(status.Status) if "Status" in status else -1


def assert_still_serving(bridge: BridgeProcess) -> None:
    """C-ECHO answers and a good instance is stored: nothing the previous sender did stopped the listener."""
    assert bridge.process is not None and bridge.process.poll() is None, bridge.log()
    assert echoscu(bridge.port).returncode == 0
    study_uid = new_study_uid()
    good = make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.9")
    assert store(bridge.port, encoded(good)) == 0x0000


def encoded(ds: Dataset) -> Dataset:
    """``ds`` with the file meta pynetdicom reads to pick the presentation context."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def lenient(**overrides: Any) -> Dataset:
    """The minimal CT dataset with ``overrides``, some of which break their VR (pydicom warns; we mean it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return encoded(make_dataset(**overrides))


BAD_DATASETS: list[tuple[str, dict[str, Any], int]] = [
    # (case, overrides of the minimal CT dataset, expected status)
    ("study uid over 64 characters", {"StudyInstanceUID": "1." + "2" * 63}, 0xC000),
    ("study uid with letters", {"StudyInstanceUID": "1.2.abc"}, 0xC000),
    ("study uid missing", {"StudyInstanceUID": None}, 0xC000),
    ("series uid empty", {"SeriesInstanceUID": ""}, 0xC000),
    # a code string beyond 16 characters is not a modality code
    ("modality over its VR (CS, 16)", {"Modality": "CT" * 10}, 0xC000),
]


@pytest.mark.parametrize(("case", "overrides", "expected"), BAD_DATASETS, ids=[row[0] for row in BAD_DATASETS])
def test_bad_required_attribute_is_refused_and_the_listener_goes_on(
    bridge: BridgeProcess, case: str, overrides: dict[str, Any], expected: int
):
    """Each malformed attribute the index keys on is refused with 0xC000; nothing is indexed."""
    before = bridge.instance_count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert store(bridge.port, lenient(**overrides)) == expected, case
    assert bridge.instance_count() == before
    assert_still_serving(bridge)


def test_descriptive_values_longer_than_their_vr_are_kept_not_refused(bridge: BridgeProcess):
    """A 40-character AccessionNumber (SH: 16) and a 200-character StudyDescription (LO: 64) are stored as sent:
    refusing the instance for them would lose images over a label."""
    study_uid = new_study_uid()
    ds = lenient(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=f"{study_uid}.1",
        SOPInstanceUID=f"{study_uid}.1.1",
        AccessionNumber="A" * 40,
        StudyDescription="x" * 200,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert store(bridge.port, ds) == 0x0000
    row = bridge.study_row(study_uid)
    assert row is not None and (row["accession_number"], row["study_description"]) == ("A" * 40, "x" * 200)


def raw_file(directory: Path, name: str, mutate: Callable[[bytes], bytes]) -> Path:
    """A DICOM file of the minimal CT dataset (series UID last), its dataset bytes changed by ``mutate``."""
    study_uid = new_study_uid()
    ds = make_dataset(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=f"{study_uid}.1.1",
        SOPInstanceUID=f"{study_uid}.1.1.1",
        SeriesNumber=None,
        InstanceNumber=None,
    )
    path = write_file(ds, directory / f"{name}.dcm")
    path.write_bytes(mutate(path.read_bytes()))
    return path


def _garble_vr(data: bytes) -> bytes:
    at = data.index(b"CS", 200)  # an explicit VR in the dataset, past the file meta
    return data[:at] + b"\x00\x01" + data[at + 2 :]


RAW_CASES: list[tuple[str, Callable[[bytes], bytes]]] = [
    # the stream ends 3 bytes early, inside the Series Instance UID: what is left ("<study>.1") is a valid UID
    ("truncated inside the series uid", lambda data: data[:-3]),
    # the stream ends in the middle of the header elements
    ("truncated mid-dataset", lambda data: data[:-60]),
    # a value representation that is not one
    ("undecodable element", _garble_vr),
]


@pytest.mark.parametrize(("case", "mutate"), RAW_CASES, ids=[row[0] for row in RAW_CASES])
def test_truncated_or_undecodable_dataset_is_refused_and_never_indexed(
    bridge: BridgeProcess, send_raw_files: None, tmp_path: Path, case: str, mutate: Callable[[bytes], bytes]
):
    """pynetdicom sends the file's bytes as they are; the bridge answers 0xC000 and indexes nothing, in
    particular not under a series UID cut short."""
    before = bridge.instance_count()
    assert store(bridge.port, raw_file(tmp_path, "bad", mutate)) == 0xC000, case
    assert bridge.instance_count() == before
    assert_still_serving(bridge)


def test_unknown_sop_class_and_transfer_syntax_are_rejected_per_presentation_context(bridge: BridgeProcess):
    """The association is accepted for what we support; the unknown SOP class gets "abstract syntax not
    supported" (3), the unknown transfer syntax "transfer syntaxes not supported" (4)."""
    assoc = associate(
        bridge.port,
        build_context("1.2.826.0.1.3680043.10.1482.999.1", [ExplicitVRLittleEndian]),
        build_context(CTImageStorage, ["1.2.826.0.1.3680043.10.1482.999.2"]),
    )
    assert assoc.is_established
    try:
        results = {str(context.abstract_syntax): context.result for context in assoc.rejected_contexts}
        assert [str(context.abstract_syntax) for context in assoc.accepted_contexts] == [str(Verification)]
    finally:
        assoc.release()
    assert results == {"1.2.826.0.1.3680043.10.1482.999.1": 3, str(CTImageStorage): 4}
    assert_still_serving(bridge)


def test_bytes_that_are_not_dicom_are_dropped(bridge: BridgeProcess):
    """An HTTP request and binary noise on the DICOM port: the connection is closed, the listener goes on."""
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            raw.recv(1024)
    assert_still_serving(bridge)


def test_connection_dropped_mid_pdu_stores_nothing(bridge: BridgeProcess):
    """A sender vanishes inside an A-ASSOCIATE-RQ, and another inside a P-DATA-TF of an established
    association (cable pulled mid-instance): nothing is indexed, the listener goes on."""
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as raw:
        raw.sendall(b"\x01\x00" + struct.pack(">I", 1000) + b"\x00" * 100)  # 100 of 1000 bytes promised
    before = bridge.instance_count()
    assoc = associate(bridge.port)
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    # 500 of the 20000 bytes promised: the start of a command fragment (an item of 19994 bytes, context 1)
    item_header = struct.pack(">IBB", 19994, assoc.accepted_contexts[0].context_id, 0x01)
    sock.sendall(b"\x04\x00" + struct.pack(">I", 20000) + item_header + b"\x00" * 494)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    wait_for(lambda: not assoc.is_alive(), timeout=10, what="the cut association to end")
    assert bridge.instance_count() == before
    wait_until_served(bridge)
    assert_still_serving(bridge)


def hold_associations(port: int, held: list[Any], count: int) -> None:
    """Fill ``held`` with ``count`` established associations. An association of an earlier case that the bridge
    is still ending holds its slot for a moment after its sender has gone, so a rejected attempt is tried again
    until that slot is free (within the network timeout and a margin)."""

    def fill() -> bool:
        while len(held) < count:
            assoc = associate(port)
            if not assoc.is_established:
                return False
            held.append(assoc)
        return True

    wait_for(fill, timeout=NETWORK_TIMEOUT + 5, what=f"{count} associations to be accepted at once", interval=0.1)


def wait_until_served(bridge: BridgeProcess) -> float:
    """Poll DCMTK echoscu (which closes its connection when rejected) until it is accepted; the seconds waited.
    Fails after the network timeout (which bounds the ACSE timeout) and a margin."""
    started = time.monotonic()
    wait_for(
        lambda: echoscu(bridge.port).returncode == 0,
        timeout=NETWORK_TIMEOUT + 5,
        what="C-ECHO to be accepted again",
        interval=0.25,
    )
    return time.monotonic() - started


def test_connections_that_never_open_an_association_take_no_association_slot(bridge: BridgeProcess):
    """As many TCP connections as there are association slots, saying nothing or half an A-ASSOCIATE-RQ and
    staying: they wait in the front door without a slot, and a modality is served while they are held."""
    sockets = [socket.create_connection(("127.0.0.1", bridge.port), timeout=5) for _ in range(MAX_ASSOCIATIONS)]
    try:
        sockets[0].sendall(b"\x01\x00" + struct.pack(">I", 1000) + b"\x00" * 100)
        waited = wait_until_served(bridge)  # while the connections stay open on our side
        print(f"{MAX_ASSOCIATIONS} half-open connections held: served after {waited:.2f} s")
    finally:
        for sock in sockets:
            sock.close()
    assert_still_serving(bridge)


def test_a_sender_that_stalls_is_disconnected_after_the_network_timeout(bridge: BridgeProcess):
    """An association that sends nothing is aborted by the bridge after dicom.network_timeout_seconds."""
    assoc = associate(bridge.port)
    assert assoc.is_established
    started = time.monotonic()
    wait_for(lambda: not assoc.is_alive(), timeout=NETWORK_TIMEOUT + 10, what="the bridge to drop the idle association")
    waited = time.monotonic() - started
    print(f"idle association aborted after {waited:.2f} s (network timeout {NETWORK_TIMEOUT} s)")
    assert assoc.is_aborted
    assert NETWORK_TIMEOUT * 0.9 <= waited <= NETWORK_TIMEOUT + 3
    assert_still_serving(bridge)


def test_associations_beyond_max_associations_are_rejected_cleanly(bridge: BridgeProcess):
    """With 3 associations open, DCMTK echoscu is rejected (transient, local limit exceeded); once they end,
    everything is served again."""
    held: list[Any] = []
    try:
        hold_associations(bridge.port, held, MAX_ASSOCIATIONS)
        assert all(assoc.is_established for assoc in held)
        refused = echoscu(bridge.port)
        assert refused.returncode != 0
        assert "Rejected Transient" in refused.stderr and "Local Limit Exceeded" in refused.stderr, refused.stderr
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    wait_until_served(bridge)
    assert_still_serving(bridge)
