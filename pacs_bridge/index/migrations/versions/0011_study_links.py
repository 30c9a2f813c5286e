"""Keep each published study's links to its Patient and ServiceRequest, and when to look them up again.

``study_links`` has one row per study published since this revision: the digest of the identifier search and
the literal reference sent for the subject (``patient.mode`` lookup/create) and for basedOn (``accession.mode``
lookup), the relink schedule and its lease. Studies published before it have no row: they get one at their next
publish (``pacs-bridge republish --since`` gives it to all of them at once).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_links",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("patient_key", sa.String(length=64), nullable=True),
        sa.Column("patient_reference", sa.String(length=128), nullable=True),
        sa.Column("order_key", sa.String(length=64), nullable=True),
        sa.Column("order_reference", sa.String(length=128), nullable=True),
        sa.Column("relink_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("relink_attempts", sa.Integer(), nullable=False),
        sa.Column("relink_claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("relink_claimed_by", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id"),
    )
    op.create_index("ix_study_links_relink_at", "study_links", ["relink_at"])


def downgrade() -> None:
    op.drop_index("ix_study_links_relink_at", table_name="study_links")
    op.drop_table("study_links")
