"""A job's table and plan are stored even when another connection commits between the two writes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from allocator.core.budget import Budget
from allocator.core.synth import synth_table
from allocator.service.infra.config import Settings
from allocator.service.store import repo
from allocator.service.store.db import migrate
from allocator.service.worker import Worker
from solvers import solve


def test_persist_survives_a_commit_between_the_table_and_the_plan(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker(settings)
    migrate(worker.engine)
    real_add_table = repo.add_table

    def add_table_then_heartbeat(session: Any, **kw: Any) -> Any:
        rec, created = real_add_table(session, **kw)
        _ = rec.id  # reading back after the commit starts a read transaction on this session
        with worker.engine.begin() as conn:  # what the heartbeat thread does meanwhile
            conn.execute(text("UPDATE cost_tables SET created_at = created_at + 1"))
        return rec, created

    monkeypatch.setattr(repo, "add_table", add_table_then_heartbeat)
    table = synth_table(n_units=6, n_options=3, seed=1)
    result = solve(table, Budget(bpw=4.0))
    out = worker._persist({"id": "j" * 32}, {}, {"table": table, "plan": result, "note": 1})
    assert out["plan_status"] == str(result.status) and out["note"] == 1
    assert {"table_id", "plan_id"} <= out.keys()
    worker.engine.dispose()
