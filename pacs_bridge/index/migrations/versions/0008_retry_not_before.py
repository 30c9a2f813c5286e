"""Keep the time before which the FHIR server asked not to be retried (Retry-After), apart from the backoff.

The publisher probes a FHIR server while studies wait in backoff and, once it answers, retries them at once;
it must not do so before a Retry-After the server gave. Existing rows get NULL (no such request).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("retry_not_before", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("retry_not_before")
