"""Keep the progress of backfills: one row per run, one per window done (index/backfill_progress.py).

New tables only; nothing existing changes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_key", sa.String(255), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("since", sa.Date(), nullable=True),
        sa.Column("until", sa.Date(), nullable=True),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("days_total", sa.Integer(), nullable=False),
        sa.Column("days_done", sa.Integer(), nullable=False),
        sa.Column("studies_found", sa.Integer(), nullable=False),
        sa.Column("studies_indexed", sa.Integer(), nullable=False),
        sa.Column("studies_unchanged", sa.Integer(), nullable=False),
        sa.Column("instances_indexed", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.create_index("ix_backfill_runs_run_key", "backfill_runs", ["run_key"])
    op.create_table(
        "backfill_windows",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("backfill_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("first_day", sa.Date(), nullable=True),
        sa.Column("last_day", sa.Date(), nullable=True),
        sa.Column("studies", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_backfill_windows_run_id", "backfill_windows", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_backfill_windows_run_id", table_name="backfill_windows")
    op.drop_table("backfill_windows")
    op.drop_index("ix_backfill_runs_run_key", table_name="backfill_runs")
    op.drop_table("backfill_runs")
