"""Alembic environment: runs on the connection pacs-bridge hands over (see index/schema.py)."""

from __future__ import annotations

from alembic import context

from pacs_bridge.index.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
