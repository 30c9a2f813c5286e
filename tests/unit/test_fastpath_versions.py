"""Which pynetdicom releases get the fast path (dicom/fastpath/__init__.py)."""

from __future__ import annotations

import pytest

from pacs_bridge.dicom import fastpath


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("3.0.4", True),  # the release the pieces were written against
        ("3.0.0", True),  # any 3.0.x
        ("3.0.5.dev0", True),  # a pre-release of the next patch
        ("3.1.0", False),  # the next minor release may change any internal
        ("2.1.1", False),  # an older major release
        ("4.0.0", False),
    ],
)
def test_only_the_releases_the_pieces_were_made_for_are_supported(version: str, supported: bool) -> None:
    assert fastpath.is_supported(version) is supported


def test_an_unsupported_release_gets_stock_pynetdicom_and_the_reason_names_it() -> None:
    result = fastpath.enable(version="3.1.0")
    assert isinstance(result, fastpath.FastPathUnavailable)
    assert "pynetdicom 3.1.0" in result.reason and "3.0.x" in result.reason


def test_an_unknown_piece_is_refused_naming_the_pieces() -> None:
    with pytest.raises(ValueError, match="inline_store"):
        fastpath.enable(["warp_drive"])
