"""Hostile content, end to end: ``pacs-bridge run`` (a subprocess, SQLite) against datasets built to hurt:
deflate bombs and corrupt deflate data, headers built to cost memory (a million sequence items, a value of
megabytes), datasets that are not what their request says, values no database can hold.

Senders: pynetdicom sending files exactly as written (tests/support/raw_files.py) and DCMTK's storescu. Each
case asserts the DIMSE status and its ErrorComment, that nothing was indexed when refused, that storescu still
gets an instance in, and that the bridge's threads, file descriptors and peak memory (VmHWM, reset before each
case) come back to, or stay near, their baseline.
"""

from __future__ import annotations

import random
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from tests.support.bridge_process import BridgeProcess, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.raw_files import MiB, deflated, encoded, pixel_data_header, store_file, write_raw_file, zeros
from tests.support.resources import Resources as ProcessResources
from tests.support.resources import open_files, peak_rss_bytes
from tests.support.studies import SeriesSpec, make_dataset, new_study_uid, write_file, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Peak memory a case may add to the bridge's baseline: its buffers, zlib's, the header kept, Python's arenas.
MEMORY_HEADROOM = 48 * MiB


@dataclass(frozen=True)
class Resources:
    threads: int
    # The listening socket, associations, wake-up pairs: every socket but the FHIR client's. Those are the
    # publisher's pool (one per concurrent PUT, kept until the server closes them and the pool next looks), so
    # their number depends on when the previous case's study was published, not on this case.
    sockets: int
    deleted_files: int  # open anonymous temporary files (spilled datasets, kept inflated headers)

    def within(self, baseline: Resources) -> bool:
        return (
            self.threads <= baseline.threads
            and self.sockets <= baseline.sockets
            and self.deleted_files <= baseline.deleted_files
        )


@pytest.fixture(scope="module")
def bridge(
    tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirTestServer, bridges_receive_both_ways: str
) -> Iterator[BridgeProcess]:
    """One bridge for the module (SQLite, the default dicom.max_inflated_bytes of 256 MiB), warmed up with one
    study from storescu, published: its baseline includes a served association and the FHIR client's
    connection."""
    directory = tmp_path_factory.mktemp("hostile-content")
    running = BridgeProcess(
        directory, database_url=f"sqlite:///{directory / 'bridge.db'}", fhir_base_url=fhir_server.base_url
    )
    try:
        running.start()
        study_uid = assert_storescu_gets_in(running, directory)
        wait_for(
            lambda: (running.study_row(study_uid) or {}).get("publish_state") == "published",
            timeout=30,
            what="the warm-up study to be published",
        )
        yield running
    finally:
        running.close()


def resources(bridge: BridgeProcess) -> Resources:
    """What the bridge's processes hold, summed (the main process and its listener processes, if any)."""
    assert bridge.fhir_port is not None
    threads = sockets = deleted_files = 0
    for pid in bridge.pids():
        threads += ProcessResources.of(pid).threads
        targets = open_files(pid)
        fhir_client = fhir_client_sockets(pid, bridge.fhir_port)
        sockets += sum(target.startswith("socket:") and target not in fhir_client for target in targets)
        deleted_files += sum(target.endswith("(deleted)") for target in targets)
    return Resources(threads=threads, sockets=sockets, deleted_files=deleted_files)


def fhir_client_sockets(pid: int, fhir_port: int) -> set[str]:
    """The descriptor targets (``socket:[inode]``) of the process's TCP connections to ``fhir_port``."""
    found = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()  # sl local_address rem_address st ... inode (the 10th)
            if int(fields[2].rsplit(":", 1)[1], 16) == fhir_port:
                found.add(f"socket:[{fields[9]}]")
    return found


def reset_peak_memory(bridge: BridgeProcess) -> int:
    """Reset the peak resident size (VmHWM) of each of the bridge's processes to its current one; their sum in
    bytes."""
    for pid in bridge.pids():
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_memory(bridge)


def peak_memory(bridge: BridgeProcess) -> int:
    """The sum of the bridge's processes' peak resident sizes, in bytes: each one's growth counts in full."""
    return sum(map(peak_rss_bytes, bridge.pids()))


def assert_storescu_gets_in(bridge: BridgeProcess, directory: Path) -> str:
    """DCMTK's storescu stores a fresh instance (whatever came before did not stop the listener); its study UID."""
    assert bridge.process is not None and bridge.process.poll() is None, bridge.log()
    study_uid = new_study_uid()
    ds = make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.1")
    sent = storescu(bridge.port, write_file(ds, directory / f"{study_uid}.dcm"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert bridge.instance_uids(study_uid) == {f"{study_uid}.1.1"}
    return study_uid


def assert_back_to(bridge: BridgeProcess, baseline: Resources) -> None:
    """Threads, sockets and temporary files come back to the baseline once the case's association has ended."""
    wait_for(lambda: resources(bridge).within(baseline), timeout=20, what=f"resources back to {baseline}")


def send_deflated(bridge: BridgeProcess, path: Path) -> Any:
    """``path`` sent as it is, on a CT context in Deflated Explicit VR Little Endian; the response."""
    return store_file(
        bridge.port, path, abstract_syntax=CT_IMAGE_STORAGE, transfer_syntax=DeflatedExplicitVRLittleEndian
    )


def new_study(size: int) -> tuple[str, bytes]:
    """A fresh study UID and its CT dataset deflated, followed by ``size`` bytes of zero pixel data."""
    study_uid = new_study_uid()
    header = encoded(
        make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.1")
    )
    return study_uid, deflated([header, pixel_data_header(size), *zeros(size)])


def write_deflated(directory: Path, study_uid: str, data: bytes) -> Path:
    return write_raw_file(
        directory / f"{study_uid}.dcm",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=f"{study_uid}.1.1",
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        dataset=data,
    )


def test_a_deflate_bomb_is_refused_naming_the_limit_in_flat_memory(bridge: BridgeProcess, tmp_path: Path) -> None:
    """About 1 MB of deflate inflating to 1 GiB: 0xC000 naming dicom.max_inflated_bytes, after inflating no more
    than 256 MiB a chunk at a time; the bridge's peak memory stays within MEMORY_HEADROOM of what it was."""
    study_uid, bomb = new_study(1024 * MiB)
    assert len(bomb) < 1200 * 1024
    path = write_deflated(tmp_path, study_uid, bomb)
    baseline = resources(bridge)
    memory_before = reset_peak_memory(bridge)

    answer = send_deflated(bridge, path)

    assert answer.Status == 0xC000
    assert "dicom.max_inflated_bytes" in answer.ErrorComment or "inflates to over" in answer.ErrorComment
    assert peak_memory(bridge) - memory_before < MEMORY_HEADROOM
    assert bridge.instance_uids(study_uid) == set()
    assert_back_to(bridge, baseline)
    assert_storescu_gets_in(bridge, tmp_path)


def test_a_deflated_instance_within_the_limit_is_stored_in_flat_memory(bridge: BridgeProcess, tmp_path: Path) -> None:
    """200 MiB of pixel data in about 200 kB of deflate (a legitimate, if blank, image): Success, indexed, and the
    bridge's peak memory stays within MEMORY_HEADROOM: inflated as a stream, the pixels thrown away."""
    study_uid, data = new_study(200 * MiB)
    path = write_deflated(tmp_path, study_uid, data)
    baseline = resources(bridge)
    memory_before = reset_peak_memory(bridge)

    answer = send_deflated(bridge, path)

    assert answer.Status == 0x0000
    assert peak_memory(bridge) - memory_before < MEMORY_HEADROOM
    assert bridge.instance_uids(study_uid) == {f"{study_uid}.1.1"}
    assert_back_to(bridge, baseline)


def header_then_garbage(study_uid: str) -> bytes:
    """A deflated CT header flushed to a byte boundary (it inflates), then bytes that are no deflate block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    header = encoded(
        make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.1")
    )
    garbage = bytes(random.Random(14).getrandbits(8) for _ in range(4096))
    return compressor.compress(header + pixel_data_header(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH) + garbage


@pytest.mark.parametrize(
    ("damaged", "detail"),
    [
        (lambda study_uid, _data: header_then_garbage(study_uid), "the deflated data is corrupt"),
        (lambda _study_uid, data: data[: len(data) // 2], "the deflated data ends before"),
    ],
    ids=["garbage after the header", "cut short"],
)
def test_corrupt_deflate_data_is_cannot_understand_not_a_processing_failure(
    bridge: BridgeProcess, tmp_path: Path, damaged: Callable[[str, bytes], bytes], detail: str
) -> None:
    """0xC000 with an ErrorComment saying what is wrong, where a header that inflates is followed by data that
    does not; no traceback in the log; nothing indexed."""
    study_uid, data = new_study(MiB)
    path = write_deflated(tmp_path, study_uid, damaged(study_uid, data))
    baseline = resources(bridge)
    log_before = len(bridge.log())

    answer = send_deflated(bridge, path)

    assert answer.Status == 0xC000
    assert answer.ErrorComment.startswith(detail)
    assert bridge.instance_uids(study_uid) == set()
    assert "Traceback" not in bridge.log()[log_before:]
    assert [e["status"] for e in log_events(bridge.log()[log_before:], "instance_rejected")] == ["0xC000"]
    assert_back_to(bridge, baseline)
    assert_storescu_gets_in(bridge, tmp_path)


def test_dcmtk_storescu_sending_deflated_gets_its_study_indexed(bridge: BridgeProcess, tmp_path: Path) -> None:
    """storescu -xd deflates a two-instance study on the wire (a real deflating peer): both indexed."""
    study_uid = new_study_uid()
    paths = write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 2)], pixel_bytes=200_000)

    sent = storescu(bridge.port, paths, extra_args=("-xd",))

    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "-> Deflated Explicit VR Little Endian" in sent.stdout + sent.stderr
    assert len(bridge.instance_uids(study_uid)) == 2


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def raw_ct_file(directory: Path, *, command_instance: str, **values: Any) -> tuple[Path, str]:
    """A file whose file meta (hence the C-STORE request) names a CT instance, with a dataset holding ``values``
    (whatever they are) in a fresh study; and that study's UID."""
    study_uid = new_study_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about the invalid values we mean to send
        dataset = encoded(
            make_dataset(
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=f"{study_uid}.1",
                SOPInstanceUID=f"{study_uid}.1.1",
                **values,
            )
        )
    path = write_raw_file(
        directory / f"{study_uid}.dcm",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=command_instance.replace("{study}", study_uid),
        transfer_syntax=ExplicitVRLittleEndian,
        dataset=dataset,
    )
    return path, study_uid


@pytest.mark.parametrize(
    ("values", "command_instance", "status", "comment"),
    [
        ({"SOPClassUID": MR_IMAGE_STORAGE, "Modality": "MR"}, "{study}.1.1", 0xA900, "SOPClassUID (0008,0016)"),
        ({}, "{study}.1.2", 0xC000, "SOPInstanceUID (0008,0018)"),
        ({"PatientID": "PHI\x00MARK"}, "{study}.1.1", 0xC000, "PatientID (0010,0020)"),
        ({"StudyTime": "1" * 33}, "{study}.1.1", 0xC000, "StudyTime (0008,0030)"),
    ],
    ids=["MR dataset as CT", "another instance", "NUL in PatientID", "StudyTime over its column"],
)
def test_a_dataset_that_is_not_what_it_claims_or_cannot_be_held_is_refused(
    bridge: BridgeProcess, tmp_path: Path, values: dict[str, Any], command_instance: str, status: int, comment: str
) -> None:
    """The status and an ErrorComment naming the attribute; nothing of the study indexed; resources back to
    their baseline; storescu still gets in."""
    path, study_uid = raw_ct_file(tmp_path, command_instance=command_instance, **values)
    baseline = resources(bridge)

    answer = store_file(bridge.port, path, abstract_syntax=CT_IMAGE_STORAGE, transfer_syntax=ExplicitVRLittleEndian)

    assert answer.Status == status
    assert answer.ErrorComment.startswith(comment)
    assert bridge.study_row(study_uid) is None
    assert_back_to(bridge, baseline)
    assert_storescu_gets_in(bridge, tmp_path)


# ---- headers built to cost memory (dicom/header.py: HeaderWalk) ----

# Peak memory a header bomb may add to the bridge's baseline: what pydicom would have built is ~1.1 GB.
HEADER_BOMB_HEADROOM = 200 * MiB


def sequence_of_empty_items(group: int, element: int, count: int) -> bytes:
    """An explicit VR sequence of undefined length holding ``count`` empty items of undefined length."""
    header = group.to_bytes(2, "little") + element.to_bytes(2, "little") + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    return header + item * count + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def write_plain(directory: Path, study_uid: str, data: bytes) -> Path:
    return write_raw_file(
        directory / f"{study_uid}.dcm",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=f"{study_uid}.1.1",
        transfer_syntax=ExplicitVRLittleEndian,
        dataset=data,
    )


def ct_header(study_uid: str) -> bytes:
    return encoded(
        make_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.1")
    )


HEADER_BOMBS = [
    # (what follows the CT header, the ErrorComment's start)
    (lambda: sequence_of_empty_items(0x0040, 0xA730, 1_100_000), "ContentSequence (0040,A730): over 200000"),
    # StudyDescription as UT (a 32-bit length) of 64 MiB
    (
        lambda: b"\x08\x00\x30\x10UT\x00\x00" + (64 * MiB).to_bytes(4, "little") + b"A" * (64 * MiB),
        "StudyDescription (0008,1030): 67108864-byte value",
    ),
]


@pytest.mark.parametrize(("bomb", "comment"), HEADER_BOMBS, ids=["1.1 million sequence items", "64 MiB value"])
def test_a_header_built_to_cost_memory_is_refused_naming_the_element_and_the_limit(
    bridge: BridgeProcess, tmp_path: Path, bomb: Callable[[], bytes], comment: str
) -> None:
    """A ContentSequence of 1.1 million empty items (17.6 MB on the wire), or a 64 MiB StudyDescription: 0xC000
    with an ErrorComment naming the element and the limit; the bridge's peak memory grows by far less than
    what pydicom would have built, nothing is indexed, resources come back and storescu still gets in."""
    study_uid = new_study_uid()
    path = write_plain(tmp_path, study_uid, ct_header(study_uid) + bomb())
    baseline = resources(bridge)
    memory_before = reset_peak_memory(bridge)

    answer = store_file(bridge.port, path, abstract_syntax=CT_IMAGE_STORAGE, transfer_syntax=ExplicitVRLittleEndian)

    assert answer.Status == 0xC000
    assert answer.ErrorComment.startswith(comment)
    assert peak_memory(bridge) - memory_before < HEADER_BOMB_HEADROOM
    assert bridge.instance_uids(study_uid) == set()
    assert_back_to(bridge, baseline)
    assert_storescu_gets_in(bridge, tmp_path)


def test_an_unread_sequence_within_the_limits_costs_no_memory(bridge: BridgeProcess, tmp_path: Path) -> None:
    """150000 empty items in a ContentSequence the bridge never reads (within the limits): Success, and the
    bridge's peak memory stays within MEMORY_HEADROOM: the items are walked over, never built."""
    study_uid = new_study_uid()
    path = write_plain(tmp_path, study_uid, ct_header(study_uid) + sequence_of_empty_items(0x0040, 0xA730, 150_000))
    memory_before = reset_peak_memory(bridge)

    answer = store_file(bridge.port, path, abstract_syntax=CT_IMAGE_STORAGE, transfer_syntax=ExplicitVRLittleEndian)

    assert answer.Status == 0x0000
    assert peak_memory(bridge) - memory_before < MEMORY_HEADROOM
    assert bridge.instance_uids(study_uid) == {f"{study_uid}.1.1"}
