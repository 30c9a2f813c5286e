"""Keep the calling AE title that first sent each series, for series-level endpoint rules by sender.

Existing series get an empty value: they match no `series_calling_aets` rule until an instance of theirs
arrives again, which records its sender.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("sending_ae_title", sa.String(length=16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("sending_ae_title")
