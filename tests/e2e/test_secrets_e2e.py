"""End to end: passwords given in ``database.url`` and ``fhir.base_url`` work and are never printed.

``pacs-bridge run`` (a subprocess, PostgreSQL) is configured with credentials in both URLs, receives a study from
DCMTK's storescu and publishes it to the FHIR test server; its whole output names both servers as ***@host. The
passwords are given as userinfo, or with a space in them and the database's as a ``?password=`` parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.bridge_process import BridgeProcess, log_events, wait_for
from tests.support.dcmtk import storescu
from tests.support.fhir_server import FhirTestServer
from tests.support.studies import SeriesSpec, new_study_uid, write_study

pytestmark = [pytest.mark.fhir_server, pytest.mark.dcmtk, pytest.mark.postgresql]

DATABASE_SECRET = "dbS3cret"
FHIR_SECRET = "fhirS3cret"
SPACED_DATABASE_SECRET = ("dbHalfOne", "dbHalfTwo")  # two words: a password shown in part is caught too
SPACED_FHIR_SECRET = ("fhirHalfOne", "fhirHalfTwo")


def userinfo_passwords(database_url: str, fhir_url: str) -> tuple[str, str, tuple[str, ...]]:
    return (
        database_url.replace("://postgres@", f"://postgres:{DATABASE_SECRET}@", 1),
        fhir_url.replace("://", f"://bridge:{FHIR_SECRET}@", 1),
        (DATABASE_SECRET, FHIR_SECRET),
    )


def spaced_passwords(database_url: str, fhir_url: str) -> tuple[str, str, tuple[str, ...]]:
    separator = "&" if "?" in database_url else "?"
    return (
        f"{database_url}{separator}password={' '.join(SPACED_DATABASE_SECRET)}",
        fhir_url.replace("://", f"://bridge:{' '.join(SPACED_FHIR_SECRET)}@", 1),
        SPACED_DATABASE_SECRET + SPACED_FHIR_SECRET,
    )


@pytest.mark.parametrize("credentials", [userinfo_passwords, spaced_passwords], ids=["userinfo", "spaced, query"])
def test_a_bridge_with_passwords_in_its_urls_publishes_and_never_prints_them(
    tmp_path: Path, postgres_schema_url: str, fresh_fhir_server: FhirTestServer, credentials: Any
) -> None:
    """bridge_started shows both URLs as ***@host; the study is published; no line holds either password."""
    database_url, fhir_url, secrets = credentials(postgres_schema_url, fresh_fhir_server.base_url)
    bridge = BridgeProcess(
        tmp_path,
        database_url=database_url,
        fhir_base_url=fhir_url,
        extra={"logging": {"level": "debug"}},
    )
    study_uid = new_study_uid()
    try:
        bridge.start()
        sent = storescu(bridge.port, write_study(tmp_path / "study", study_uid, [SeriesSpec("CT", 2)]))
        wait_for(
            lambda: (bridge.study_row(study_uid) or {}).get("publish_state") == "published",
            timeout=60,
            what="the study to be published",
        )
        assert bridge.stop() == 0
    finally:
        bridge.close()

    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert fresh_fhir_server.read("ImagingStudy", study_uid) is not None
    output = bridge.log()
    (started,) = log_events(output, "bridge_started")
    assert started["database"].startswith("postgresql+psycopg://***@127.0.0.1:5432/test")
    assert started["fhir_base_url"] == f"http://***@127.0.0.1:{fresh_fhir_server.port}/fhir"
    for secret in secrets:
        assert secret not in output, secret
