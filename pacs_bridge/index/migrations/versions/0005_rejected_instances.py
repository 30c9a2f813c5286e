"""Remember the instances IHE IOCM rejection notes withdrew, so that a re-send does not bring them back.

One row per rejected SOP Instance UID, whether or not the instance ever reached the index; the modality of
its series when it had (an ImagingStudy whose every instance was rejected still names its modalities).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("reason_code", sa.String(length=16), nullable=False),
        sa.Column("note_uid", sa.String(length=64), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_rejected_instances_study_uid", "rejected_instances", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_rejected_instances_study_uid", table_name="rejected_instances")
    op.drop_table("rejected_instances")
