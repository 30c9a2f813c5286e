"""Keep the server's version id of the ImagingStudy last written, for the If-Match of the next PUT.

Existing rows get NULL: their next PUT goes without If-Match, as before this revision, and records the version.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("published_version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("published_version")
