"""Alembic environment, run programmatically by :func:`allocator.service.store.db.migrate`
with an open connection in ``config.attributes["connection"]`` (no alembic.ini)."""

from __future__ import annotations

from alembic import context

from allocator.service.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
