"""Keep what the standards-faithful mapping needs: the accession number's issuer, and each requested reason
whole.

- ``accession_issuer_local_id``, ``accession_issuer_universal_id``: the Issuer of Accession Number Sequence's
  LocalNamespaceEntityID and UniversalEntityID, for the accession identifier's system (``accession.issuers``).
  Existing rows get empty values: until an instance of such a study arrives again, its accession number takes
  ``accession.identifier_system`` as before.
- ``reasons`` holds each Reason for the Requested Procedure as ``[text, [code, ...]]``: a text and the codes
  stated with it are one reason. ``reason_codes`` goes. Existing rows cannot say which code went with which
  text, so each becomes its own reason, as the mapping sent them until now, until the study's next instance.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_ACCESSION_ISSUER_COLUMNS = ("accession_issuer_local_id", "accession_issuer_universal_id")
_studies = sa.table(
    "studies", sa.column("id", sa.Integer), sa.column("reasons", sa.Text), sa.column("reason_codes", sa.Text)
)


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        for column in _ACCESSION_ISSUER_COLUMNS:
            batch.add_column(sa.Column(column, sa.Text(), nullable=False, server_default=""))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(_studies.c.id, _studies.c.reasons, _studies.c.reason_codes).where(
            sa.or_(_studies.c.reasons != "[]", _studies.c.reason_codes != "[]")
        )
    ).all()
    for row in rows:
        reasons = [["", [code]] for code in json.loads(row.reason_codes or "[]")]
        reasons += [[text, []] for text in json.loads(row.reasons or "[]")]
        connection.execute(
            sa.update(_studies).where(_studies.c.id == row.id).values(reasons=json.dumps(reasons, ensure_ascii=False))
        )
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("reason_codes")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("reason_codes", sa.Text(), nullable=False, server_default="[]"))
    connection = op.get_bind()
    for row in connection.execute(sa.select(_studies.c.id, _studies.c.reasons).where(_studies.c.reasons != "[]")).all():
        reasons = json.loads(row.reasons)
        texts = [text for text, _codes in reasons if text]
        codes = [code for _text, codes in reasons for code in codes]
        connection.execute(
            sa.update(_studies)
            .where(_studies.c.id == row.id)
            .values(reasons=json.dumps(texts, ensure_ascii=False), reason_codes=json.dumps(codes, ensure_ascii=False))
        )
    with op.batch_alter_table("studies") as batch:
        for column in reversed(_ACCESSION_ISSUER_COLUMNS):
            batch.drop_column(column)
