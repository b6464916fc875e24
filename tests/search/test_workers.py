"""Several worker processes share one study (SQLite file, PostgreSQL): every trial once."""

from __future__ import annotations

from pathlib import Path

import pytest

from allocator import Budget, CostTable, InvalidParameterError, check_plan
from allocator.jobs.search import SearchSpec, run_search, study_trials

N_TRIALS = 16
WORKERS = 2


def _spec(tmp_path: Path, table: CostTable, storage: str | None, study: str | None) -> SearchSpec:
    path = tmp_path / "t.parquet"
    table.save(path)
    return SearchSpec(table_path=str(path), budget={"bpw": 3.5}, n_trials=N_TRIALS, seed=0,
                      storage=storage, study=study)


def _check_study(storage: str, study: str, table: CostTable, spec: SearchSpec) -> None:
    trials = list(study_trials(storage, study))
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers)), "a trial was recorded twice"
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    # MaxTrialsCallback stops each worker after its running trial: at most workers-1 extra.
    assert N_TRIALS <= len(finished) <= N_TRIALS + WORKERS - 1
    assert all(t["state"] != "RUNNING" for t in trials), "a trial was left running"
    cap = 3.5 * table.total_params
    assert all(t["size_bits"] <= cap * (1 + 1e-9) for t in finished)


def test_two_workers_share_a_sqlite_study(tmp_path: Path, table: CostTable) -> None:
    url = f"sqlite:///{tmp_path / 'search.db'}"
    spec = _spec(tmp_path, table, url, "shared")
    result = run_search(spec, workers=WORKERS)
    assert result.plan is not None and check_plan(result.plan, table, Budget(bpw=3.5)) == []
    _check_study(url, "shared", table, spec)


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(tmp_path: Path, table: CostTable, pg_url: str) -> None:
    import uuid

    study = f"pg-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, table, pg_url, study)
    result = run_search(spec, workers=WORKERS)
    assert result.plan is not None and check_plan(result.plan, table, Budget(bpw=3.5)) == []
    _check_study(pg_url, study, table, spec)


def test_workers_need_shared_storage(tmp_path: Path, table: CostTable) -> None:
    with pytest.raises(InvalidParameterError, match="--storage"):
        run_search(_spec(tmp_path, table, None, None), workers=2)
