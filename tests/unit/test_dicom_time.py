"""Unit tests for ``pacs_bridge.fhir.dicom_time.to_fhir_datetime``: DICOM DA/TM (+ offset) -> FHIR dateTime."""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

import pytest

from pacs_bridge.fhir.dicom_time import to_fhir_datetime

PARIS = ZoneInfo("Europe/Paris")

# The FHIR R4 dateTime regular expression (datatypes.html#dateTime), to check every non-None output.
FHIR_DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
    r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)


@pytest.mark.parametrize(
    ("dicom_date", "dicom_time", "offset", "site_zone", "expected"),
    [
        # date only: stays a date, no time and no offset invented
        ("20240315", "", "", PARIS, "2024-03-15"),
        # HH: minutes and seconds completed, FHIR needs seconds
        ("20240315", "10", "", UTC, "2024-03-15T10:00:00+00:00"),
        # HHMM: seconds completed
        ("20240315", "1015", "", UTC, "2024-03-15T10:15:00+00:00"),
        # HHMMSS
        ("20240315", "101530", "", UTC, "2024-03-15T10:15:30+00:00"),
        # HHMMSS.FFFFFF: all six fraction digits kept
        ("20240315", "101530.123456", "", UTC, "2024-03-15T10:15:30.123456+00:00"),
        # HHMMSS.F: the fraction keeps its own precision, not padded to six digits
        ("20240315", "101530.1", "", UTC, "2024-03-15T10:15:30.1+00:00"),
        # midnight is a real time, not "no time"
        ("20240315", "000000", "", UTC, "2024-03-15T00:00:00+00:00"),
        # TimezoneOffsetFromUTC east of UTC, with minutes
        ("20240315", "101530", "+0530", PARIS, "2024-03-15T10:15:30+05:30"),
        # TimezoneOffsetFromUTC west of UTC: wins over the site zone
        ("20240315", "101530", "-0800", PARIS, "2024-03-15T10:15:30-08:00"),
        # the +1400 maximum of DICOM is also the FHIR maximum
        ("20240315", "101530", "+1400", PARIS, "2024-03-15T10:15:30+14:00"),
        # no offset, site zone in winter: CET
        ("20240115", "101530", "", PARIS, "2024-01-15T10:15:30+01:00"),
        # no offset, site zone in summer: CEST (DST applies to the study's own date)
        ("20240715", "101530", "", PARIS, "2024-07-15T10:15:30+02:00"),
        # the day before the 2024 spring-forward (31 March) is still winter time
        ("20240330", "120000", "", PARIS, "2024-03-30T12:00:00+01:00"),
        # the day after the spring-forward is summer time
        ("20240401", "120000", "", PARIS, "2024-04-01T12:00:00+02:00"),
        # legacy ACR-NEMA date YYYY.MM.DD
        ("2024.03.15", "101530", "", UTC, "2024-03-15T10:15:30+00:00"),
        # legacy time HH:MM:SS
        ("20240315", "10:15:30", "", UTC, "2024-03-15T10:15:30+00:00"),
        # padding around values is ignored
        (" 20240315 ", " 101530 ", " +0100 ", UTC, "2024-03-15T10:15:30+01:00"),
        # leap second 60 is allowed by both DICOM and FHIR and kept as written
        ("20161231", "235960", "+0000", PARIS, "2016-12-31T23:59:60+00:00"),
    ],
)
def test_to_fhir_datetime_renders_valid_values(
    dicom_date: str, dicom_time: str, offset: str, site_zone: tzinfo, expected: str
) -> None:
    """Valid DICOM date/time/offset render as a FHIR dateTime with the precision the DICOM value had."""
    rendered = to_fhir_datetime(dicom_date, dicom_time, offset, site_zone)

    assert rendered == expected
    assert FHIR_DATETIME.fullmatch(rendered)


@pytest.mark.parametrize(
    ("dicom_date", "dicom_time"),
    [
        ("", "101530"),  # no date: a time alone is no FHIR dateTime
        ("20240230", "101530"),  # 30 February does not exist
        ("20241301", "101530"),  # month 13
        ("2024031", "101530"),  # seven digits
        ("15/03/2024", "101530"),  # not a DICOM date format
        ("00000000", ""),  # year 0 is outside both calendars
    ],
)
def test_invalid_date_gives_none(dicom_date: str, dicom_time: str) -> None:
    """Without a real calendar date there is no started value at all."""
    assert to_fhir_datetime(dicom_date, dicom_time, "", UTC) is None


@pytest.mark.parametrize(
    "dicom_time",
    [
        "251530",  # hour 25
        "106030",  # minute 60
        "101561",  # second 61
        "10xx",  # letters
        "1",  # a single digit is not an hour
        "101530.1234567",  # seven fraction digits: over DICOM's six
    ],
)
def test_invalid_time_gives_the_date_only(dicom_time: str) -> None:
    """A bad time loses the time, not the whole value: the valid date is still published."""
    assert to_fhir_datetime("20240315", dicom_time, "", UTC) == "2024-03-15"


@pytest.mark.parametrize(
    "offset",
    [
        "0530",  # no sign
        "+5",  # too short
        "+2500",  # hours out of range
        "+0160",  # minutes out of range
        "UTC",  # a name, not an offset
    ],
)
def test_invalid_offset_falls_back_to_the_site_zone(offset: str) -> None:
    """A malformed TimezoneOffsetFromUTC is ignored in favour of the configured site zone."""
    assert to_fhir_datetime("20240715", "101530", offset, PARIS) == "2024-07-15T10:15:30+02:00"


def test_offset_beyond_plus_fourteen_hours_falls_back_to_the_site_zone() -> None:
    """+1430 is past DICOM's +1400 maximum and FHIR's +14:00, so it is treated as invalid."""
    assert to_fhir_datetime("20240715", "101530", "+1430", PARIS) == "2024-07-15T10:15:30+02:00"


def test_zone_without_offset_is_rendered_as_utc() -> None:
    """A tzinfo whose utcoffset is None never yields a dateTime without an offset."""

    class NoOffset(tzinfo):
        def utcoffset(self, dt: datetime | None) -> None:
            return None

        def dst(self, dt: datetime | None) -> None:
            return None

        def tzname(self, dt: datetime | None) -> None:
            return None

    assert to_fhir_datetime("20240315", "101530", "", NoOffset()) == "2024-03-15T10:15:30+00:00"


def test_no_site_zone_uses_an_offset_from_the_host_rules() -> None:
    """site_zone None still gives a dateTime with an offset (the host's), never a bare local time."""
    rendered = to_fhir_datetime("20240315", "101530", "", None)

    assert rendered is not None
    assert FHIR_DATETIME.fullmatch(rendered)
    assert rendered.startswith("2024-03-15T10:15:30")
