"""The SQLite store (every table and plan) and the files next to it are private to the user."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from allocator.service.infra.config import Settings
from tests.service.conftest import upload


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: files 0644 unless created private
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_store_is_created_0600(tmp_path, open_umask, table):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from allocator.service import create_app

    folder = tmp_path / "fresh" / "bitalloc"
    app = create_app(Settings(db_url=f"sqlite:///{folder / 'service.db'}"))  # generated token
    try:
        client = TestClient(app, base_url="http://localhost",
                            headers={"Authorization": f"Bearer {app.state.settings.token}"})
        upload(client, table)
        files = sorted(p.name for p in folder.iterdir())
        assert {"service.db", "service.db-wal", "service.db-shm", "service.token"} <= set(files)
        for name in files:
            assert _mode(folder / name) == 0o600, (name, oct(_mode(folder / name)))
        assert _mode(folder) == 0o700
    finally:
        app.state.db.engine.dispose()


def test_existing_open_database_is_reported(tmp_path, open_umask, caplog):  # type: ignore[no-untyped-def]
    from allocator.service.store.db import make_engine

    db = tmp_path / "old.db"
    db.touch(mode=0o644)
    make_engine(f"sqlite:///{db}").dispose()
    assert "readable by others" in caplog.text and "chmod 600" in caplog.text
