"""Keep what the complete ImagingStudy mapping needs: names, codes, body part, laterality, instance titles.

Multi-valued names and code sequences are JSON arrays in TEXT columns (``TextTuple``, ``CodedConceptTuple``).
Existing rows get empty values, so a study indexed before this revision maps as it did until it changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (table, column, type, server default for the rows that already exist)
_COLUMNS: list[tuple[str, str, sa.types.TypeEngine[Any], str]] = [
    ("studies", "referring_physician", sa.Text(), ""),
    ("studies", "reading_physicians", sa.Text(), "[]"),
    ("studies", "procedure_codes", sa.Text(), "[]"),
    ("studies", "reasons", sa.Text(), "[]"),
    ("studies", "reason_codes", sa.Text(), "[]"),
    ("series", "body_part_examined", sa.Text(), ""),
    ("series", "laterality", sa.String(length=16), ""),
    ("series", "performing_physicians", sa.Text(), "[]"),
    ("series", "operators", sa.Text(), "[]"),
    ("instances", "image_laterality", sa.String(length=16), ""),
    ("instances", "title", sa.Text(), ""),
]


def upgrade() -> None:
    for table, column, type_, default in _COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(column, type_, nullable=False, server_default=default))


def downgrade() -> None:
    for table, column, _type, _default in reversed(_COLUMNS):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
