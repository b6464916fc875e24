"""Engines and migrations.

SQLite: WAL journal (readers never block the writer), a busy timeout instead of instant
``database is locked`` errors, foreign keys on, and explicit ``BEGIN`` so a connection can ask
for ``BEGIN IMMEDIATE`` (``execution_options(sqlite_immediate=True)``) when it must take the
write lock before reading — how workers claim jobs atomically. PostgreSQL: a pre-ping pool.
Migrations are alembic scripts run programmatically at startup under a cross-process lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

__all__ = ["is_sqlite", "make_engine", "migrate"]

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_PG_LOCK_ID = 0x62_69_74_61  # "bita": one advisory lock id for schema upgrades


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (pysqlite would defer it)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against process crashes (kill -9) in WAL mode; only power loss
        # can drop the last transactions.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _private_sqlite_file(path: Path) -> None:
    """Create the database 0600 in a 0700 folder (it holds every table and plan); SQLite gives
    its -wal/-shm files the database's mode. An existing readable one is only warned about."""
    import logging
    import os

    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            logging.getLogger("bitalloc.service").warning(
                "database %s is readable by others (mode %o); run chmod 600 on it and its "
                "-wal/-shm files", path, mode)


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    """An engine for ``url`` with the settings above; creates the SQLite file's folder."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:" and not path.startswith("file:"):
            _private_sqlite_file(Path(path.split("?", 1)[0]).expanduser())
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=pool_size, max_overflow=2 * pool_size)
        _sqlite_events(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=2 * pool_size)


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations between the server and workers starting at the same time."""
    if is_sqlite(engine):
        import fcntl
        import os

        db = engine.url.database or ""
        if not db or db == ":memory:":
            yield
            return
        lock = Path(db).expanduser().with_suffix(".migrate.lock")
        with open(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_ID})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_ID})
            conn.commit()


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with _schema_lock(engine), engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
