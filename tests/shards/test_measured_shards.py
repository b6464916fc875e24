"""Sharded ``measured`` over Optuna storage on the bundled tiny Llama: the same table as one
process, every shard once, resume after a dead worker, SQLite and PostgreSQL, CLI and errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("optuna")

from allocator import CostTable  # noqa: E402
from allocator.cli import main  # noqa: E402
from allocator.core.errors import InvalidParameterError  # noqa: E402
from sensitivity import EstimateSpec, Sharding  # noqa: E402
from sensitivity import shard_queue as q  # noqa: E402
from sensitivity._sharded import ShardJob, run_shards  # noqa: E402

# Block 0 of the tiny Llama (7 units) × 2 options on 4 short texts: seconds, not minutes.
KW = {"samples": 4, "seq_len": 16, "batch_size": 2, "include": "*layers.0.*",
      "options": "int2-g128-asym,int4-g128-asym"}
N_SHARDS = 4


@pytest.fixture(scope="module")
def reference() -> CostTable:
    from allocator.core.errors import ModelError
    from sensitivity import estimate

    try:
        return estimate("tiny-llama", EstimateSpec(method="measured", progress=False, **KW))  # type: ignore[arg-type]
    except ModelError as exc:
        pytest.skip(f"the bundled tiny Llama is missing: {exc}")


def _spec(storage: str | None, study: str | None = "t", workers: int = 1, **kw: object) -> ShardJob:
    sharding = Sharding(storage=storage, study=study, n_shards=kw.pop("n_shards", N_SHARDS),  # type: ignore[arg-type]
                        workers=workers, **kw)  # type: ignore[arg-type]
    estimate = EstimateSpec(method="measured", progress=False, sharding=sharding, **KW)  # type: ignore[arg-type]
    return ShardJob(model="tiny-llama", spec=estimate)


def run_sharded(job: ShardJob, *, workers: int) -> object:
    """The outcome of ``job`` with ``workers`` local processes (sensitivity.estimate's sharded path)."""
    import dataclasses

    sharding = dataclasses.replace(job.sharding, workers=workers)
    return run_shards(ShardJob(model=job.model, spec=dataclasses.replace(job.spec, sharding=sharding)))


def assert_same_table(got: CostTable, ref: CostTable) -> None:
    a = ref.df.set_index(["unit", "option"]).sort_index()
    b = got.df.set_index(["unit", "option"]).sort_index()
    assert list(a.columns) == list(b.columns) and a.index.equals(b.index)
    for col in a.columns:
        if col in ("cost", "cost_std"):  # other processes use other thread counts: round-off
            np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-5, atol=1e-12)
        else:
            assert a[col].equals(b[col]), col
    same = ("estimator", "estimator_params", "metric", "n_batches", "model_fingerprint",
            "data_fingerprint", "units_count", "filters", "seed")
    assert {k: got.metadata[k] for k in same} == {k: ref.metadata[k] for k in same}
    assert "sharded" not in ref.metadata


def assert_each_shard_once(storage: str, study: str, n: int = N_SHARDS) -> list[dict]:
    rows = q.shard_trials(storage, study)
    complete = sorted(r["shard"] for r in rows if r["state"] == "COMPLETE")
    assert complete == list(range(n)), rows
    assert all(r["state"] in ("COMPLETE", "FAIL") for r in rows), rows
    return rows


def _two_workers_then_rerun(storage: str, reference: CostTable, kind: str) -> None:
    # max_shards=2: the coordinator stops after two shards, so the spawned worker must do two.
    out = run_sharded(_spec(storage, max_shards=2), workers=2)
    assert out.table is not None and out.pending == () and out.measured == N_SHARDS
    assert_same_table(out.table, reference)
    meta = out.table.metadata["sharded"]
    assert meta["n_shards"] == N_SHARDS and meta["storage"] == kind and meta["study"] == "estimate-t"
    assert "secret" not in str(out.table.metadata) and "@" not in str(meta)
    rows = assert_each_shard_once(storage, "estimate-t")
    owners = {r["owner"].rsplit(":", 1)[-1] for r in rows if r["state"] == "COMPLETE"}
    assert owners == {"0", "1"}  # both processes measured shards
    again = run_sharded(_spec(storage, n_shards=None), workers=1)  # re-run: merge only
    assert again.measured == 0 and again.table is not None
    assert len(q.shard_trials(storage, "estimate-t")) == len(rows)
    assert_same_table(again.table, reference)


def _resume_after_dead_worker(storage: str, reference: CostTable, *, wait: bool) -> None:
    first = run_sharded(_spec(storage, study="r", max_shards=1), workers=1)
    assert first.table is None and len(first.pending) == N_SHARDS - 1
    study = q.open_queue(q.open_storage(storage), "estimate-r", fingerprint=_fingerprint(storage, "r"),
                         n_shards=None, default_shards=1, summary={})[0]
    dead = q.claim(study, N_SHARDS, "dead-host:1:x:0")  # claimed, then the worker vanished
    assert dead is not None
    live = run_sharded(_spec(storage, study="r"), workers=1)  # fresh heartbeat: not taken over
    assert live.table is None and live.pending == (dead.shard,)
    if wait:  # --wait: poll while the shard looks alive, take it over once it goes stale
        dead.trial.set_user_attr("heartbeat", time.time() + 6)
        done = run_sharded(_spec(storage, study="r", wait=True, stale_after_s=1.0, poll_s=0.2),
                           workers=1)
    else:  # a later re-run finds the heartbeat an hour old
        dead.trial.set_user_attr("heartbeat", time.time() - 3600)
        done = run_sharded(_spec(storage, study="r"), workers=1)
    assert done.table is not None and done.pending == ()
    assert_same_table(done.table, reference)
    rows = assert_each_shard_once(storage, "estimate-r")
    assert [r["state"] for r in rows if r["owner"] == "dead-host:1:x:0"] == ["FAIL"]


def _fingerprint(storage: str, study: str) -> str:
    import optuna

    return str(optuna.load_study(study_name=f"estimate-{study}", storage=storage).user_attrs["fingerprint"])


def test_sqlite_two_workers_match_one_process(tmp_path: Path, reference: CostTable) -> None:
    _two_workers_then_rerun(f"sqlite:///{tmp_path / 'e.db'}", reference, "sqlite")


def test_sqlite_resume_after_dead_worker(tmp_path: Path, reference: CostTable) -> None:
    _resume_after_dead_worker(f"sqlite:///{tmp_path / 'e.db'}", reference, wait=False)


def test_sqlite_wait_takes_over_a_shard_that_goes_stale(tmp_path: Path, reference: CostTable) -> None:
    _resume_after_dead_worker(f"sqlite:///{tmp_path / 'e.db'}", reference, wait=True)


@pytest.mark.postgres
def test_postgres_two_workers_and_resume(pg_url: str, reference: CostTable) -> None:
    _two_workers_then_rerun(pg_url, reference, "postgresql")
    _resume_after_dead_worker(pg_url, reference, wait=False)


def test_in_memory_storage_one_process(reference: CostTable) -> None:
    out = run_sharded(_spec(None, study=None, n_shards=3), workers=1)
    assert out.table is not None and out.n_shards == 3 and out.study.startswith("estimate-")
    assert out.table.metadata["sharded"]["storage"] == "memory"
    assert_same_table(out.table, reference)


def test_cli_writes_the_table_and_refuses_bad_flags(tmp_path: Path, reference: CostTable,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"

    def argv(*extra: str, options: str = KW["options"], method: str = "measured") -> list[str]:
        return ["estimate", "tiny-llama", "--method", method, "--samples", "4", "--seq-len", "16",
                "--batch-size", "2", "--include", "*layers.0.*", "--options", options,
                "--no-progress", *extra]

    shared = ("--storage", url, "--study", "cli")
    out = tmp_path / "t.parquet"
    assert main(argv(*shared, "--shards", "2", "-o", str(out))) == 0
    assert_same_table(CostTable.load(out), reference)
    assert_each_shard_once(url, "estimate-cli", 2)

    def err(args: list[str]) -> str:  # our one line comes last (transformers draws a load bar)
        assert main(args) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    head = "bitalloc estimate: error: "
    assert err(argv(*shared, "--shards", "3")).startswith(
        f"{head}study 'estimate-cli' has 2 shards, got --shards 3; pass --shards 2")
    msg = err(argv(*shared, options="int3-g128-asym"))
    assert msg.startswith(f"{head}study 'estimate-cli' holds another estimation") and "--study" in msg
    assert err(argv(*shared, method="hessian-eig")) == (
        f"{head}--storage shards 'measured' (by unit) and the batch-additive estimators (by "
        "batch), not 'hessian-eig', whose statistics do not add over batches; drop --storage or "
        "use another --method")
    assert err(argv("--workers", "2", method="lim")).startswith(f"{head}--workers shards")
    assert err(argv(*shared, "--shards", "0")) == f"{head}shards must be an int ≥ 1, got 0"
    assert "shared storage" in err(argv("--workers", "2"))
    assert "in-process pool" in err(argv(*shared, "--param", "workers=2"))


def test_bad_specs() -> None:
    with pytest.raises(InvalidParameterError, match="shards must be an int ≥ 1, got 0"):
        Sharding(n_shards=0)
    with pytest.raises(InvalidParameterError, match="not a database URL"):
        Sharding(storage="nonsense")
    with pytest.raises(InvalidParameterError, match="no parameter 'max_probes'"):
        EstimateSpec(method="measured", params={"max_probes": 3}, sharding=Sharding())
    with pytest.raises(InvalidParameterError, match="'hessian-eig' is not batch-additive"):
        EstimateSpec(method="hessian-eig", sharding=Sharding())
    with pytest.raises(InvalidParameterError, match="workers must be an int ≥ 1"):
        Sharding(workers=0)
    with pytest.raises(InvalidParameterError, match="sequential runs in one process"):
        EstimateSpec(method="measured", sharding=Sharding(), sequential=True)


def test_estimate_dispatches_a_sharded_spec_and_says_what_is_pending(tmp_path: Path,
                                                                   reference: CostTable) -> None:
    from sensitivity import ShardsPending, estimate

    url = f"sqlite:///{tmp_path / 'e.db'}"
    job = _spec(url, study="d", max_shards=1)
    with pytest.raises(ShardsPending, match="1/4 shards complete") as info:
        estimate("tiny-llama", job.spec)
    assert len(info.value.outcome.pending) == N_SHARDS - 1
    import dataclasses

    table = estimate("tiny-llama", dataclasses.replace(job.spec, sharding=Sharding(storage=url, study="d")))
    assert_same_table(table, reference)
    assert set(reference.metadata) | {"sharded"} == set(table.metadata)
