"""Alembic's environment for the registry: it runs on the connection `seektune.registry.store` hands it
(inside that connection's transaction, so a migration is all or nothing and concurrent openers wait)."""

from __future__ import annotations

from alembic import context

from seektune.registry.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
