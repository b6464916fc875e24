"""The service schema and Optuna search studies can live in one database (both use alembic)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from allocator.service.store.db import make_engine, migrate


def test_service_and_optuna_share_a_database(db_url: str) -> None:
    optuna = pytest.importorskip("optuna")
    engine = make_engine(db_url)
    try:
        migrate(engine)
        study = optuna.create_study(storage=db_url, study_name="shared", direction="minimize")
        study.optimize(lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=2)
        migrate(engine)  # idempotent after Optuna wrote its own alembic revision
        names = set(inspect(engine).get_table_names())
        assert {"cost_tables", "plans", "jobs", "bitalloc_alembic_version", "alembic_version"} <= names
        again = optuna.load_study(study_name="shared", storage=db_url)
        assert len(again.trials) == 2
    finally:
        engine.dispose()
