"""Fixtures: a fresh database per test (SQLite always, PostgreSQL when available), the app, a
TestClient with and without the token, an in-process worker and small tables."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient  # noqa: E402

from allocator.core.synth import synth_table  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.service.infra.config import Settings  # noqa: E402

PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))  # the test job kinds, importable here and in subprocesses
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: a Host the default allow-list takes (TestClient's own "testserver" is refused, as it should)
BASE = "http://localhost"
PG_URL_FILE = Path(os.environ.get("BITALLOC_PG_URL_FILE", "/tmp/bitalloc_pg_url"))


def pg_url() -> str | None:
    url = os.environ.get("BITALLOC_TEST_PG_URL")
    if not url and PG_URL_FILE.is_file():
        url = PG_URL_FILE.read_text().strip()
    return url or None


_PG_REASON: list[str] = []


def _pg_reachable(url: str) -> bool:
    if _PG_REASON:
        return _PG_REASON[0] == ""
    try:
        from sqlalchemy import create_engine, text

        eng = create_engine(url)
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
        _PG_REASON.append("")
    except Exception as exc:  # noqa: BLE001 - any failure means: skip with the reason
        _PG_REASON.append(f"PostgreSQL at {url} unreachable: {type(exc).__name__}")
    return _PG_REASON[0] == ""


def reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    url = pg_url()
    if url is None:
        pytest.skip("PostgreSQL not configured: run scripts/ci_postgres.sh or set BITALLOC_TEST_PG_URL")
    if not _pg_reachable(url):
        pytest.skip(_PG_REASON[0])
    reset_pg(url)
    return url


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "config.json").write_text("{}")
    return root


@pytest.fixture
def settings(db_url: str, model_root: Path) -> Settings:
    return Settings(db_url=db_url, token=TOKEN, model_roots=[model_root], heartbeat_s=0.1,
                    stale_after_s=1.0, poll_s=0.02, job_modules=["bitalloc_test_jobkinds"],
                    max_body_bytes=2 * 2**20)


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from allocator.service import create_app

    app = create_app(settings)
    yield app
    app.state.db.engine.dispose()


@pytest.fixture
def client(app) -> TestClient:  # type: ignore[no-untyped-def]
    """Authenticated client (every write needs the token)."""
    return TestClient(app, headers=AUTH, base_url=BASE)


@pytest.fixture
def anon(app) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(app, base_url=BASE)


@pytest.fixture
def worker(settings: Settings) -> Iterator[object]:
    """A worker polling in a background thread for the test's duration."""
    from allocator.service.worker import Worker

    w = Worker(settings)
    stop = threading.Event()
    t = threading.Thread(target=w.run_forever, args=(stop,), daemon=True)
    t.start()
    yield w
    stop.set()
    t.join(timeout=10)
    w.engine.dispose()


@pytest.fixture
def table() -> CostTable:
    return synth_table(n_units=12, n_options=4, seed=0)


def upload(client: TestClient, table: CostTable, name: str = "t.parquet") -> dict[str, object]:
    from allocator.service.parquet import table_to_parquet

    r = client.post("/v1/tables", files={"file": (name, table_to_parquet(table))})
    assert r.status_code in (200, 201), r.text
    out: dict[str, object] = r.json()
    return out


def wait_job(client: TestClient, job_id: str, timeout: float = 20.0,
             until: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict[str, object]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.02)
