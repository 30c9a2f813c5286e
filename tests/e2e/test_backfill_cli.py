"""``pacs-bridge backfill`` as the operator runs it: against a real Orthanc, stopped by SIGINT and continued,
watched through ``status`` and the metrics, refused with the key to fix when the configuration lacks it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from pacs_bridge.index.backfill_progress import BackfillLedger
from pacs_bridge.index.engine import make_engine
from pacs_bridge.index.schema import prepare_schema
from pacs_bridge.metrics import BridgeMetrics
from pacs_bridge.study_queue import StateCounts
from tests.support.bridge_process import log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.orthanc import OrthancServer, orthanc_missing
from tests.support.studies import SeriesSpec, new_study_uid, study_datasets, write_file

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.dcmtk,
    pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or ""),
]


@pytest.fixture
def orthanc_with_three_years(tmp_path: Path) -> Iterator[tuple[OrthancServer, list[str]]]:
    """Orthanc holding one small study dated in each of 2022, 2023 and 2024."""
    study_uids = []
    paths = []
    for year in (2022, 2023, 2024):
        study_uid = new_study_uid()
        study_uids.append(study_uid)
        for ds in study_datasets(study_uid, [SeriesSpec("CT", 2)], pixel_bytes=512):
            ds.StudyDate = ds.SeriesDate = f"{year}0601"
            paths.append(write_file(ds, tmp_path / "files" / f"{ds.SOPInstanceUID}.dcm"))
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        sent = storescu(orthanc.dicom_port, paths, called_ae="ORTHANC")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        yield orthanc, study_uids


def write_config(tmp_path: Path, pacs: dict[str, Any]) -> tuple[Path, str]:
    database_url = f"sqlite:///{tmp_path / 'index.db'}"
    config = {
        "database": {"url": database_url},
        "fhir": {"base_url": "http://127.0.0.1:9/fhir"},
        "pacs": pacs,
        "logging": {"level": "info", "format": "json"},
    }
    path = tmp_path / "pacs-bridge.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    engine = make_engine(database_url)  # the index `pacs-bridge run` creates at its first start
    prepare_schema(engine)
    engine.dispose()
    return path, database_url


def bridge(*args: str) -> list[str]:
    return [sys.executable, "-m", "pacs_bridge", *args]


def test_sigint_stops_a_backfill_that_the_same_command_then_continues(
    orthanc_with_three_years: tuple[OrthancServer, list[str]], tmp_path: Path
):
    """Ctrl-C after the first window: exit 4 naming what to do, status shows the run stopped; the same command
    continues it to the end (exit 0), status and the metrics show it complete."""
    orthanc, _ = orthanc_with_three_years
    # One request a second: after the first window (a QIDO and a metadata request) four requests remain, so
    # the SIGINT lands mid-run however fast or slow the machine.
    config, database_url = write_config(tmp_path, {"dicomweb_url": orthanc.dicomweb_url, "max_requests_per_second": 1})
    command = bridge(
        "backfill", "--config", str(config), "--source", "dicomweb", "--since", "2022-01-01", "--until", "2024-12-31"
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engine = create_engine(database_url)
    try:

        def windows_done() -> int:
            try:
                with engine.connect() as connection:
                    return int(connection.execute(text("SELECT count(*) FROM backfill_windows")).scalar_one())
            except Exception:  # the table is not there before the backfill has created the schema
                return 0

        wait_for(lambda: windows_done() >= 1 or process.poll() is not None, timeout=60, what="a window done")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 4, stdout + stderr
    assert "run the same command again to continue" in stderr
    assert log_events(stdout, "backfill_stop_requested")
    status = subprocess.run(bridge("status", "--config", str(config), "--json"), capture_output=True, text=True)
    assert json.loads(status.stdout)["backfills"][0]["state"] == "stopped"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    [started] = log_events(resumed.stdout, "backfill_started")
    assert started["resumed"] is True
    assert "3 studies found, 3 indexed (6 instances), 0 unchanged, 0 failed" in resumed.stdout
    progress = log_events(resumed.stdout, "backfill_progress")
    assert progress[-1]["days_done"] == progress[-1]["days_total"] == 1096
    status = subprocess.run(bridge("status", "--config", str(config)), capture_output=True, text=True)
    assert "backfill 1: dicomweb 2022-01-01..2024-12-31: complete" in status.stdout
    assert "1096/1096 days, 3 studies found, 3 indexed" in status.stdout

    metrics = BridgeMetrics(
        lambda: StateCounts(pending=3, published=0, failed=0), backfill_totals=BackfillLedger(engine).totals
    )
    exposition = metrics.render().decode()
    assert "pacs_bridge_backfill_studies_indexed_total 3.0" in exposition
    assert "pacs_bridge_backfill_running 0.0" in exposition
    assert "pacs_bridge_backfill_days_remaining 0.0" in exposition
    engine.dispose()


def test_dry_run_asks_the_pacs_and_records_nothing(
    orthanc_with_three_years: tuple[OrthancServer, list[str]], tmp_path: Path
):
    """--dry-run says which studies are new, changed or unchanged and what it would index, and leaves the index
    empty."""
    orthanc, study_uids = orthanc_with_three_years
    config, database_url = write_config(tmp_path, {"dicomweb_url": orthanc.dicomweb_url})

    dry = subprocess.run(
        bridge("backfill", "--config", str(config), "--source", "dicomweb", "--study", study_uids[1], "--dry-run"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert (
        "(dry run): 1 studies found: 1 new, 0 changed, 0 unchanged; it would index 1 studies (2 instances), 0 failed"
    ) in dry.stdout
    engine = create_engine(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM instances")).scalar_one() == 0
        assert connection.execute(text("SELECT count(*) FROM backfill_runs")).scalar_one() == 0
    engine.dispose()


@pytest.mark.parametrize(
    ("pacs", "source", "named"),
    [
        # C-FIND asked, but only DICOMweb configured
        ({"dicomweb_url": "http://127.0.0.1:9/dicom-web"}, "dimse", "at 'pacs.dimse'"),
        # DICOMweb asked, but only C-FIND configured
        ({"dimse": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}, "dicomweb", "at 'pacs.dicomweb_url'"),
    ],
)
def test_a_source_the_configuration_does_not_describe_is_refused_naming_the_key(
    pacs: dict[str, Any], source: str, named: str, tmp_path: Path
):
    """Exit 2 and the key to fill in, before anything is asked of any PACS."""
    config, _ = write_config(tmp_path, pacs)

    refused = subprocess.run(
        bridge("backfill", "--config", str(config), "--source", source), capture_output=True, text=True, timeout=60
    )

    assert refused.returncode == 2
    assert named in refused.stderr


def test_a_dry_run_without_an_index_compares_with_none_and_creates_none(
    orthanc_with_three_years: tuple[OrthancServer, list[str]], tmp_path: Path
):
    """Before the bridge has created its index a dry run still asks the PACS: it says there is no index (and
    where it looked), counts every study as new, and leaves no file behind."""
    orthanc, _ = orthanc_with_three_years
    config, _ = write_config(tmp_path, {"dicomweb_url": orthanc.dicomweb_url})
    config.write_text(config.read_text(encoding="utf-8").replace("index.db", "not-yet.db"), encoding="utf-8")

    dry = subprocess.run(
        bridge("backfill", "--config", str(config), "--source", "dicomweb", "--since", "2022-01-01", "--dry-run"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"no index database at {tmp_path / 'not-yet.db'}" in dry.stderr
    assert "dry run: compared with no index, every study found is new" in dry.stderr
    assert "3 studies found: 3 new, 0 changed, 0 unchanged; it would index 3 studies (6 instances)" in dry.stdout
    assert not (tmp_path / "not-yet.db").exists()


def test_an_unreachable_pacs_ends_the_backfill_with_one_error_naming_it(tmp_path: Path):
    """Orthanc is down: the backfill of five years exits 1 at once with one error naming the URL to check, and
    no window failed one after the other; status shows the run incomplete with that error."""
    with OrthancServer(tmp_path / "down") as orthanc:
        url = orthanc.dicomweb_url  # started for real ports, then stopped
    config, _ = write_config(tmp_path, {"dicomweb_url": url})

    refused = subprocess.run(
        bridge("backfill", "--config", str(config), "--source", "dicomweb", "--since", "2020-01-01"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert refused.returncode == 1, refused.stdout + refused.stderr
    [error] = [line for line in refused.stderr.splitlines() if "PACS" in line]
    assert error.startswith(f"pacs-bridge: cannot reach the PACS at {url} (ConnectError")
    assert "check pacs.dicomweb_url" in error
    assert not log_events(refused.stdout, "backfill_failed")
    status = subprocess.run(bridge("status", "--config", str(config), "--json"), capture_output=True, text=True)
    [run] = json.loads(status.stdout)["backfills"]
    assert run["state"] == "incomplete" and f"cannot reach the PACS at {url}" in run["last_error"]


def test_a_backfill_never_creates_an_index_and_names_where_it_looked(tmp_path: Path):
    """Before the bridge has created its index (or with a wrong database.url) the backfill exits 1 naming the
    path, and leaves no file behind."""
    config, _ = write_config(tmp_path, {"dicomweb_url": "http://127.0.0.1:9/dicom-web"})
    text_ = config.read_text(encoding="utf-8").replace("index.db", "elsewhere.db")
    config.write_text(text_, encoding="utf-8")

    refused = subprocess.run(
        bridge("backfill", "--config", str(config), "--source", "dicomweb"), capture_output=True, text=True, timeout=60
    )

    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"no index database at {tmp_path / 'elsewhere.db'}" in refused.stderr
    assert not (tmp_path / "elsewhere.db").exists()
