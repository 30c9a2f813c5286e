"""Pure conversion of DICOM DA/TM values to FHIR ``dateTime`` strings.

A FHIR dateTime that carries a time must carry a UTC offset and seconds. DICOM gives the offset in
TimezoneOffsetFromUTC (0008,0201) when the modality knows it; otherwise the site's time zone applies
(DST-aware, for the local date and time in question). Precision is kept: a date alone stays a date, and
fractional seconds survive; hours-only or hours-and-minutes times are completed with zeros because FHIR
requires seconds.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone, tzinfo

_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DA_LEGACY = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")  # ACR-NEMA 2.0 dates, still seen from old modalities
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def parse_dicom_date(value: str) -> date | None:
    """A DA value as a date; ``None`` when empty or not a real calendar date."""
    text = value.strip()
    match = _DA.fullmatch(text) or _DA_LEGACY.fullmatch(text)
    if not match:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def parse_utc_offset(value: str) -> timezone | None:
    """A TimezoneOffsetFromUTC value (``+HHMM`` / ``-HHMM``) as a fixed offset; ``None`` when absent or invalid."""
    match = _OFFSET.fullmatch(value.strip())
    if not match:
        return None
    hours, minutes = int(match[2]), int(match[3])
    delta = timedelta(hours=hours, minutes=minutes)
    if minutes > 59 or delta > timedelta(hours=14):  # FHIR dateTime offsets stop at +-14:00
        return None
    return timezone(-delta if match[1] == "-" else delta)


def _format_offset(offset: timedelta) -> str:
    total_minutes = int(offset.total_seconds() // 60)
    sign = "-" if total_minutes < 0 else "+"
    hours, minutes = divmod(abs(total_minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def to_fhir_datetime(dicom_date: str, dicom_time: str, timezone_offset: str, site_zone: tzinfo | None) -> str | None:
    """Render DICOM date + time as a FHIR dateTime, or ``None`` when the date is absent or invalid.

    ``site_zone`` applies when ``timezone_offset`` is empty or invalid; ``None`` means the host's local
    time zone rules.
    """
    day = parse_dicom_date(dicom_date)
    if day is None:
        return None
    time_match = _TM.fullmatch(dicom_time.strip())
    if not time_match:
        return day.isoformat()
    hour = int(time_match[1])
    minute = int(time_match[2] or 0)
    second = int(time_match[3] or 0)
    fraction = time_match[4] or ""
    if hour > 23 or minute > 59 or second > 60:
        return day.isoformat()
    # A leap second (60) cannot be a datetime; its offset is the one of the second before.
    local = datetime(day.year, day.month, day.day, hour, minute, min(second, 59))
    fixed = parse_utc_offset(timezone_offset)
    offset: timedelta | None
    if fixed is not None:
        offset = fixed.utcoffset(None)
    elif site_zone is not None:
        offset = site_zone.utcoffset(local)
    else:
        offset = local.astimezone().utcoffset()
    if offset is None:  # a tzinfo without an offset: treat as UTC rather than emit an invalid dateTime
        offset = timedelta(0)
    text = f"{day.isoformat()}T{hour:02d}:{minute:02d}:{second:02d}"
    if fraction:
        text += f".{fraction}"
    return text + _format_offset(offset)
