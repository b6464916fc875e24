"""Alembic environment, run programmatically by :func:`allocator.service.store.db.migrate`
with an open connection in ``config.attributes["connection"]`` (no alembic.ini)."""

from __future__ import annotations

from alembic import context

from allocator.service.store.models import Base

#: Not alembic's default ``alembic_version``: Optuna's RDB storage keeps its own schema revision
#: there, and one PostgreSQL database often holds both the service and shared search studies.
VERSION_TABLE = "bitalloc_alembic_version"

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
