"""A fresh PostgreSQL database per test (a copy of tests/search/conftest.py's ``pg_url``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_URL_FILE = Path(os.environ.get("BITALLOC_PG_URL_FILE", "/tmp/bitalloc_pg_url"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of its own on the test server, dropped afterwards (skips with the reason)."""
    url = os.environ.get("BITALLOC_TEST_PG_URL", "")
    if not url and PG_URL_FILE.is_file():
        url = PG_URL_FILE.read_text().strip()
    if not url:
        pytest.skip("PostgreSQL not available: scripts/ci_postgres.sh did not start a server "
                    "(no BITALLOC_TEST_PG_URL and no /tmp/bitalloc_pg_url)")
    from sqlalchemy import create_engine, make_url, text

    name = f"bitalloc_shards_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure means: skip with the reason
        admin.dispose()
        pytest.skip(f"PostgreSQL at {url} unusable: {type(exc).__name__}: {exc}".splitlines()[0])
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
