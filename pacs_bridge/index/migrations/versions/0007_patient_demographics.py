"""Keep the patient's name, birth date and sex, for the Patient that ``patient.mode: create`` makes.

Existing rows get empty values: until an instance of such a study arrives again, a Patient created for it
carries only its identifier (and conditional create never changes a Patient that exists).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_COLUMNS: list[tuple[str, sa.types.TypeEngine[Any]]] = [
    ("patient_name", sa.Text()),
    ("patient_birth_date", sa.String(length=16)),
    ("patient_sex", sa.String(length=16)),
]


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for column, type_ in _COLUMNS:
            batch.add_column(sa.Column(column, type_, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for column, _type in reversed(_COLUMNS):
            batch.drop_column(column)
