"""Dependencies as ``Annotated`` aliases: settings, the database, authentication."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from allocator.service.infra.auth import token_error
from allocator.service.infra.config import Settings
from allocator.service.store.db import is_sqlite
from allocator.service.store.repo import TableCache

__all__ = ["Db", "DbDep", "ReadAuth", "SettingsDep", "WriteAuth"]


class Db:
    """Sessions for one app: ``read()`` for queries, ``write()`` for changes.

    On SQLite ``write()`` begins with ``BEGIN IMMEDIATE`` so a read-then-write transaction
    waits for the lock up front instead of failing with ``database is locked`` half-way.
    Handlers do their heavy work (parsing, solving) before opening a write session.
    """

    def __init__(self, engine: Engine, cache: TableCache) -> None:
        self.engine = engine
        self.cache = cache
        # SQLite has one writer at a time; queueing this process's writers on a lock is fairer
        # and faster than SQLite's busy handler (which sleeps up to 100 ms between retries).
        self._write_lock = threading.Lock() if is_sqlite(engine) else None

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        if self._write_lock is None:
            with Session(self.engine, expire_on_commit=False) as session:
                yield session
            return
        with self._write_lock, Session(self.engine, expire_on_commit=False) as session:
            session.connection(execution_options={"sqlite_immediate": True})
            yield session


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Db:
    db: Db = request.app.state.db
    return db


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Db, Depends(get_db)]

_bearer = HTTPBearer(auto_error=False, description="the server's token (BITALLOC_TOKEN or its token file)")


def _check(settings: Settings, request: Request) -> None:
    # Guard (main.py) already refused a bad token before the body was read; this keeps the
    # routes safe when mounted without it and declares the scheme in the OpenAPI spec.
    err = token_error(settings, request.headers)
    if err is not None:
        raise err


def require_read(request: Request, settings: SettingsDep,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Reads are open on loopback; off loopback every request needs the token (``creds`` is
    there so the OpenAPI spec declares the bearer scheme; the headers are checked directly)."""
    if not settings.loopback_only:
        _check(settings, request)


def require_write(request: Request, settings: SettingsDep,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Every write needs the token, whatever the bind address."""
    _check(settings, request)


ReadAuth = Depends(require_read)
WriteAuth = Depends(require_write)
