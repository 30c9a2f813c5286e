"""The index schema: studies, series, instances, with each study's publish state on its own row.

The database is the single source of truth for what is pending, published or failed: the debounce due time,
the publish lease, attempts and the hash of the last published resource all live on ``studies``, so a
restart (or another bridge sharing the PostgreSQL database) picks up exactly where the last one left off.
"""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime

from sqlalchemy import DateTime, Dialect, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from pacs_bridge.records import MAX_CODE_CHARS, MAX_DATE_CHARS, MAX_TIME_CHARS, CodedConcept, RequestedReason


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive; we restore the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the index; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class TextTuple(TypeDecorator[tuple[str, ...]]):
    """A tuple of strings (multi-valued DICOM texts and person names), stored as a JSON array in a TEXT column."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: tuple[str, ...] | None, dialect: Dialect) -> str:
        return json.dumps(list(value or ()), ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> tuple[str, ...]:
        return tuple(str(item) for item in json.loads(value)) if value else ()


class CodedConceptTuple(TypeDecorator[tuple[CodedConcept, ...]]):
    """DICOM code sequence items, stored as a JSON array of ``[code, scheme, meaning, scheme_version]``."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: tuple[CodedConcept, ...] | None, dialect: Dialect) -> str:
        rows = [[c.code, c.scheme, c.meaning, c.scheme_version] for c in value or ()]
        return json.dumps(rows, ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> tuple[CodedConcept, ...]:
        if not value:
            return ()
        return tuple(
            CodedConcept(code=code, scheme=scheme, meaning=meaning, scheme_version=version)
            for code, scheme, meaning, version in json.loads(value)
        )


class RequestedReasonTuple(TypeDecorator[tuple[RequestedReason, ...]]):
    """Reasons for the requested procedure, stored as a JSON array of ``[text, [[code, scheme, meaning,
    scheme_version], ...]]``."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: tuple[RequestedReason, ...] | None, dialect: Dialect) -> str:
        rows = [[r.text, [[c.code, c.scheme, c.meaning, c.scheme_version] for c in r.codes]] for r in value or ()]
        return json.dumps(rows, ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> tuple[RequestedReason, ...]:
        if not value:
            return ()
        return tuple(
            RequestedReason(
                text=text,
                codes=tuple(
                    CodedConcept(code=code, scheme=scheme, meaning=meaning, scheme_version=version)
                    for code, scheme, meaning, version in codes
                ),
            )
            for text, codes in json.loads(value)
        )


class PublishState(enum.StrEnum):
    PENDING = "pending"  # has unpublished changes; due_at says when
    PUBLISHED = "published"  # the FHIR server holds what the index holds
    FAILED = "failed"  # the FHIR server refused it; last_error says why; retried on change or by the operator


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(Text, default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(Text, default="")
    # Only the Patient that patient.mode create makes uses these (see records.StudyAttributes).
    patient_name: Mapped[str] = mapped_column(Text, default="")
    patient_birth_date: Mapped[str] = mapped_column(String(MAX_DATE_CHARS), default="")
    patient_sex: Mapped[str] = mapped_column(String(MAX_CODE_CHARS), default="")
    accession_number: Mapped[str] = mapped_column(Text, default="")
    accession_issuer_local_id: Mapped[str] = mapped_column(Text, default="")
    accession_issuer_universal_id: Mapped[str] = mapped_column(Text, default="")
    study_date: Mapped[str] = mapped_column(String(MAX_DATE_CHARS), default="")
    study_time: Mapped[str] = mapped_column(String(MAX_TIME_CHARS), default="")
    timezone_offset: Mapped[str] = mapped_column(String(MAX_CODE_CHARS), default="")
    study_description: Mapped[str] = mapped_column(Text, default="")
    referring_physician: Mapped[str] = mapped_column(Text, default="")
    reading_physicians: Mapped[tuple[str, ...]] = mapped_column(TextTuple, default=())
    procedure_codes: Mapped[tuple[CodedConcept, ...]] = mapped_column(CodedConceptTuple, default=())
    reasons: Mapped[tuple[RequestedReason, ...]] = mapped_column(RequestedReasonTuple, default=())

    # Debounce and publish state.
    change_seq: Mapped[int] = mapped_column(Integer, default=0)  # +1 for every indexed change
    first_change_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # first unpublished change
    last_change_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # NULL: nothing to publish
    publish_state: Mapped[str] = mapped_column(String(16), default=PublishState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed attempts since the last success
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # backoff after a failure
    # The server asked for no retry before this (Retry-After): a recovery probe never wakes the study earlier.
    retry_not_before: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime)  # publish lease
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    published_hash: Mapped[str | None] = mapped_column(String(64))
    published_seq: Mapped[int | None] = mapped_column(Integer)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The server's version id of the ImagingStudy we last wrote: the If-Match of our next PUT.
    published_version: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_studies_due_at", "due_at"),
        Index("ix_studies_publish_state", "publish_state"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(MAX_CODE_CHARS))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(Text, default="")
    series_date: Mapped[str] = mapped_column(String(MAX_DATE_CHARS), default="")
    series_time: Mapped[str] = mapped_column(String(MAX_TIME_CHARS), default="")
    body_part_examined: Mapped[str] = mapped_column(Text, default="")
    laterality: Mapped[str] = mapped_column(String(MAX_CODE_CHARS), default="")
    performing_physicians: Mapped[tuple[str, ...]] = mapped_column(TextTuple, default=())
    operators: Mapped[tuple[str, ...]] = mapped_column(TextTuple, default=())
    # Calling AE title of the association that first sent the series (series-level endpoint rules).
    sending_ae_title: Mapped[str] = mapped_column(String(MAX_CODE_CHARS), default="")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_laterality: Mapped[str] = mapped_column(String(MAX_CODE_CHARS), default="")
    title: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RejectedInstance(Base):
    """An instance an IHE IOCM rejection note withdrew: never indexed again, even when it is sent again.

    Kept by SOP Instance UID whether or not the instance ever arrived, so a late arrival stays rejected.
    ``reason_code`` is the note's DCM title code (113001, 113037, 113038, 113039); ``note_uid`` the note's
    own SOP Instance UID.
    """

    __tablename__ = "rejected_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(MAX_CODE_CHARS), default="")  # empty: it never reached the index
    reason_code: Mapped[str] = mapped_column(String(16))
    note_uid: Mapped[str] = mapped_column(String(64))
    rejected_at: Mapped[datetime] = mapped_column(UtcDateTime)


class EndpointPublication(Base):
    """The content hash of each Endpoint resource last PUT, so it is sent once, and again only when changed."""

    __tablename__ = "endpoint_publications"

    endpoint_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(UtcDateTime)


class StudyLink(Base):
    """The literal references a published study's subject and basedOn carry, and when to look them up again.

    A link is "waiting" when its identifier is searchable (``*_key``: a digest of ``system|value``) and no
    literal reference was sent (``*_reference`` NULL); the relink pass claims such rows once ``relink_at`` has
    come (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, then a lease, like the publish claim). One row per study that
    was published since schema revision 0009.
    """

    __tablename__ = "study_links"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    patient_key: Mapped[str | None] = mapped_column(String(64))
    patient_reference: Mapped[str | None] = mapped_column(String(128))  # Patient/<id>: "Patient/" + 64
    order_key: Mapped[str | None] = mapped_column(String(64))
    order_reference: Mapped[str | None] = mapped_column(String(128))  # ServiceRequest/<id>
    relink_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # next lookup; NULL: nothing waits
    relink_attempts: Mapped[int] = mapped_column(Integer, default=0)  # lookups in a row that found nothing new
    relink_claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime)  # relink lease
    relink_claimed_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (Index("ix_study_links_relink_at", "relink_at"),)
