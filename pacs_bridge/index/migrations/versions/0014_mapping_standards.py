"""Keep the issuer of the accession number, for the accession identifier's system (``accession.issuers``).

The Issuer of Accession Number Sequence's LocalNamespaceEntityID and UniversalEntityID. Existing rows get empty
values: such a study's accession number takes ``accession.identifier_system`` until an instance of it arrives
again and states its issuer.

Revision ID: 0014
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0008"
branch_labels = None
depends_on = None

_COLUMNS = ("accession_issuer_local_id", "accession_issuer_universal_id")


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for column in _COLUMNS:
            batch.add_column(sa.Column(column, sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column)
