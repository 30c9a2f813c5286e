"""Index studies by publish state: status, metrics and the failed-study list read by it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_studies_publish_state", "studies", ["publish_state"])


def downgrade() -> None:
    op.drop_index("ix_studies_publish_state", table_name="studies")
