from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from allocator import CostTable

PG_URL_FILE = Path(os.environ.get("BITALLOC_PG_URL_FILE", "/tmp/bitalloc_pg_url"))


def small_table(n: int = 8, seed: int = 0) -> CostTable:
    """A realistic little table: costs ∝ s · 4^(−b), sizes from the catalogue."""
    rng = np.random.default_rng(seed)
    bits = np.arange(2, 9)
    s = rng.lognormal(0.0, 1.0, size=n)
    cost = s[:, None] * 4.0 ** (-bits[None, :]) * rng.uniform(0.8, 1.2, size=(n, len(bits)))
    return CostTable.from_unit_costs(
        units=[f"model.layers.{i // 2}.mlp.{'up' if i % 2 else 'down'}_proj" for i in range(n)],
        params=list(rng.integers(64, 512, size=n) * 128),
        options=[f"int{b}-g128-asym" for b in bits], cost=cost,
    )


@pytest.fixture
def table() -> CostTable:
    return small_table()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the test server for each test, dropped afterwards.

    The server's default test database is shared with the service tests, whose schema (and any
    left over from an earlier run on the same machine) must not leak into an Optuna study.
    """
    url = os.environ.get("BITALLOC_TEST_PG_URL", "")
    if not url and PG_URL_FILE.is_file():
        url = PG_URL_FILE.read_text().strip()
    if not url:
        pytest.skip("PostgreSQL not available: scripts/ci_postgres.sh did not start a server "
                    "(no BITALLOC_TEST_PG_URL and no /tmp/bitalloc_pg_url)")
    from sqlalchemy import create_engine, make_url, text

    name = f"bitalloc_search_{uuid.uuid4().hex[:10]}"
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
