"""Count a backfill's studies once per run: each window done keeps what it found, and failures are counted apart.

A run's figures become those of its windows done plus those of its latest start, so that a resumed run no
longer counts again the studies of a window it retries; the metrics add up the windows' figures (which only
grow) and ``failures_reported`` (every failure reported, which only grows). Existing windows get 0 (their
figures were not kept), existing runs their failures so far.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

WINDOW_COUNTS = ("studies_indexed", "studies_unchanged", "instances_indexed")


def upgrade() -> None:
    with op.batch_alter_table("backfill_windows") as batch:
        for column in WINDOW_COUNTS:
            batch.add_column(sa.Column(column, sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("backfill_runs") as batch:
        batch.add_column(sa.Column("failures_reported", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE backfill_runs SET failures_reported = failures")


def downgrade() -> None:
    with op.batch_alter_table("backfill_runs") as batch:
        batch.drop_column("failures_reported")
    with op.batch_alter_table("backfill_windows") as batch:
        for column in reversed(WINDOW_COUNTS):
            batch.drop_column(column)
