"""Shared fixtures: hypothesis profile (derandomized for CI), offline Hugging Face, PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    from allocator.model.loading import LoadedModel

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

PG_URL_FILE = Path(os.environ.get("BITALLOC_PG_URL_FILE", "/tmp/bitalloc_pg_url"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of its own on the test server for each test, dropped afterwards.

    The server's default test database is shared with the service tests, whose schema (and any
    left over from an earlier run on the same machine) must not leak into Optuna studies.
    Skips with the reason when no server is configured or usable.
    """
    url = os.environ.get("BITALLOC_TEST_PG_URL", "")
    if not url and PG_URL_FILE.is_file():
        url = PG_URL_FILE.read_text().strip()
    if not url:
        pytest.skip("PostgreSQL not available: scripts/ci_postgres.sh did not start a server "
                    "(no BITALLOC_TEST_PG_URL and no /tmp/bitalloc_pg_url)")
    from sqlalchemy import create_engine, make_url, text

    name = f"bitalloc_test_{uuid.uuid4().hex[:10]}"
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


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """The bundled tiny Llama (loaded once per test module: tests may quantize it in place)."""
    from allocator.model.loading import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_calib(tiny: LoadedModel) -> list[dict[str, Any]]:
    """8 corpus samples of ≤ 32 tokens in batches of 4: some rows are padded, so token masks matter."""
    from allocator.model.data import CalibrationData

    return list(CalibrationData.from_corpus(tiny.tokenizer, n_samples=8, seq_len=32, batch_size=4))
