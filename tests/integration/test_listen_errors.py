"""A port the bridge cannot open: `run` says which one (DICOM or HTTP), on which address, the keys that set it
and what to do, and exits 1."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pacs_bridge.errors import ListenError
from pacs_bridge.http import HealthServer
from tests.support.bridge_process import free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on for the whole test."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield int(holder.getsockname()[1])


def run_bridge(tmp_path: Path, *, dicom_port: int, http_port: int) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "pacs-bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"bind": "127.0.0.1", "port": dicom_port},
                "database": {"url": f"sqlite:///{tmp_path / 'index.db'}"},
                "fhir": {"base_url": "http://127.0.0.1:9/fhir"},
                "http": {"bind": "127.0.0.1", "port": http_port},
            }
        ),
        encoding="utf-8",
    )
    return subprocess.run(
        [sys.executable, "-m", "pacs_bridge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dicom_port_in_use_is_named_with_its_keys_and_what_to_do(tmp_path: Path, taken_port: int):
    """Another program on the DICOM port: exit 1 naming DICOM, the address, dicom.port and how to find the holder."""
    result = run_bridge(tmp_path, dicom_port=taken_port, http_port=free_port())

    assert result.returncode == 1
    assert (
        f"pacs-bridge: cannot listen for DICOM on 127.0.0.1:{taken_port} (dicom.bind, dicom.port): the port is "
        f"already in use, perhaps by another pacs-bridge; stop the program holding it (`ss -ltnp 'sport = "
        f":{taken_port}'` names it) or set dicom.port to a free port"
    ) in result.stderr


def test_http_port_in_use_is_named_with_its_keys(tmp_path: Path, taken_port: int):
    """Another program on the health and metrics port: the message says HTTP's keys, not DICOM's."""
    result = run_bridge(tmp_path, dicom_port=free_port(), http_port=taken_port)

    assert result.returncode == 1
    assert (
        f"pacs-bridge: cannot listen for health and metrics on 127.0.0.1:{taken_port} (http.bind, http.port): "
        "the port is already in use"
    ) in result.stderr


def test_an_address_that_is_not_this_hosts_is_named_with_its_key():
    """http.bind set to an address the host does not have (TEST-NET-1): told to pick one of its own."""
    with pytest.raises(ListenError) as caught:
        HealthServer(bind="192.0.2.1", port=0, readiness_checks={}, render_metrics=lambda: b"")

    assert str(caught.value) == (
        "cannot listen for health and metrics on 192.0.2.1:0 (http.bind, http.port): 192.0.2.1 is not an address "
        "of this host; set http.bind to one of its addresses, or 0.0.0.0 for all of them"
    )


def test_a_privileged_port_names_the_capability_it_needs():
    """Port 104 as an unprivileged user (EACCES): the capability, and where the unit grants it."""
    error = ListenError(
        service="DICOM", key_prefix="dicom", bind="0.0.0.0", port=104, cause=PermissionError(errno.EACCES, "denied")
    )

    assert str(error) == (
        "cannot listen for DICOM on 0.0.0.0:104 (dicom.bind, dicom.port): this user may not listen on port 104; "
        "ports below 1024 need the CAP_NET_BIND_SERVICE capability (see deploy/pacs-bridge.service), or set "
        "dicom.port to 1024 or above"
    )
