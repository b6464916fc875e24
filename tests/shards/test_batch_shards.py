"""Batch-additive estimators sharded by calibration batch over an SQLite Optuna storage: the
merged table equals the single-process one (float round-off), for every shardable estimator;
the mergeable-statistics contract itself (sums ↔ sample means, JSON, merge checks); refusals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from allocator.core.errors import InvalidParameterError
from sensitivity._base import Partial, mean_and_sem, mean_sums

# Block 0 of the tiny Llama (7 units) × 2 options on 6 short texts in 3 batches of 2.
KW: dict[str, Any] = {"samples": 6, "seq_len": 16, "batch_size": 2, "include": "model.layers.0",
                      "options": "int2-g128-asym,int4-g128-asym"}
N_SHARDS = 3
#: metadata that legitimately differs between a sharded and a single-process run (salience's
#: ``passes`` under its memory budget exist only in one process; a shard's partial holds every H)
RUN_KEYS = {"seconds", "sharded", "created", "passes"}


# ------------------------------------------------------------------ the contract, no model
def test_sample_mean_sums_round_trip_and_merge() -> None:
    """(mean, sem, N, P) of each part → sums → merged (mean, sem) = those of all samples."""
    rng = np.random.default_rng(0)
    t = rng.gamma(2.0, 1.5, size=(11, 4, 3))  # per-sample terms of 4 units × 3 options
    pos = rng.integers(1, 9, size=11)  # counted positions per sample

    def direct(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        x, n, p = t[idx], len(idx), int(pos[idx].sum())
        sem = x.std(axis=0, ddof=1) / math.sqrt(n) * n / p if n > 1 else np.zeros(x.shape[1:])
        return x.sum(axis=0) / p, sem, n, p

    whole = direct(np.arange(11))
    s1, s2 = np.zeros(t.shape[1:]), np.zeros(t.shape[1:])
    for idx in (np.arange(0, 5), np.arange(5, 6), np.arange(6, 11)):  # a part of one sample too
        mean, sem, n, p = direct(idx)
        a, b = mean_sums(mean, sem, n, p)
        s1, s2 = s1 + a, s2 + b
    mean, sem = mean_and_sem(s1, s2, 11, int(pos.sum()))
    np.testing.assert_allclose(mean, whole[0], rtol=1e-12)
    np.testing.assert_allclose(sem, whole[1], rtol=1e-9)


def test_partial_json_is_exact_and_merge_checks() -> None:
    rng = np.random.default_rng(1)
    a = Partial(sums={"x": rng.normal(size=(3, 2)), "y": rng.normal(size=5) * 1e-300},
                counts={"n": 4}, info={"metric": "kl"}, batches=(0, 2))
    back = Partial.from_json(a.to_json())
    assert back.batches == (0, 2) and back.counts == {"n": 4} and back.info == {"metric": "kl"}
    for k in a.sums:
        assert np.array_equal(back.sums[k], a.sums[k])  # bit for bit
    b = Partial(sums={"x": np.ones((3, 2)), "y": np.ones(5)}, counts={"n": 1},
                info={"metric": "kl"}, batches=(1,))
    m = Partial.merge([a, b])
    assert m.batches == (0, 2, 1) and m.counts == {"n": 5}
    np.testing.assert_array_equal(m.sums["x"], a.sums["x"] + 1)
    with pytest.raises(InvalidParameterError, match=r"batches \[2\] are in two"):
        Partial.merge([a, Partial(sums=b.sums, counts=b.counts, info=b.info, batches=(2,))])
    with pytest.raises(InvalidParameterError, match=r"disagree on \['metric'\]"):
        Partial.merge([a, Partial(sums=b.sums, counts=b.counts, info={"metric": "cos"})])
    with pytest.raises(InvalidParameterError, match="different sums"):
        Partial.merge([a, Partial(sums={"x": np.ones((3, 2))}, counts=b.counts, info=b.info)])
    with pytest.raises(InvalidParameterError, match="malformed partial"):
        Partial.from_json({"sums": {"x": {"shape": [3], "f8": "AAAA"}}, "counts": {},
                          "info": {}, "batches": []})


def test_batch_seeds_follow_the_batch_not_the_shard() -> None:
    from sensitivity import EstimateContext

    ctx = EstimateContext(batches=[{}, {}, {}], units=[], options=[], seed=7)
    sub = ctx.subset([2, 0])
    assert sub.batch_ids == (2, 0)
    assert sub.batch_seed(0) == ctx.batch_seed(2) and sub.batch_seed(1) == ctx.batch_seed(0)
    assert len({ctx.batch_seed(i) for i in range(3)}) == 3
    assert EstimateContext(batches=[{}], units=[], options=[], seed=8).batch_seed(0) != ctx.batch_seed(0)
    with pytest.raises(InvalidParameterError, match="batch_ids must be 3 distinct"):
        EstimateContext(batches=[{}, {}, {}], units=[], options=[], batch_ids=(0, 0, 1))


# ------------------------------------------------------------------ sharded = single process
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("optuna")

from allocator import CostTable  # noqa: E402
from sensitivity import EstimateSpec, Sharding  # noqa: E402
from sensitivity import shard_queue as q  # noqa: E402
from sensitivity._sharded import ShardJob, run_shard_worker, run_shards  # noqa: E402
from sensitivity._spec import sharded_methods  # noqa: E402


def _cases() -> list[tuple[str, dict[str, Any]]]:
    # every method that shards by batch with its defaults (so a newly additive one is tested),
    # cheap settings, and fisher's second target
    cheap: dict[str, dict[str, Any]] = {"gauss-newton": {"probes": 1}, "fisher": {"probes": 1}}
    out = [(m, cheap.get(m, {})) for m in sharded_methods() if m != "measured"]
    return [*out, ("fisher", {"target": "empirical"})]


CASES = _cases()


def _reference(method: str, params: dict[str, Any]) -> CostTable:
    from allocator.core.errors import ModelError
    from sensitivity import estimate

    try:
        return estimate("tiny-llama", EstimateSpec(method=method, params=params, progress=False, **KW))
    except ModelError as exc:
        pytest.skip(f"the bundled tiny Llama is missing: {exc}")


def _spec(method: str, params: dict[str, Any], storage: str | None, **kw: Any) -> ShardJob:
    kw.setdefault("n_shards", N_SHARDS)
    sharding = Sharding(storage=storage, study="b", **kw)
    estimate = EstimateSpec(method=method, params=params, progress=False, sharding=sharding, **KW)
    return ShardJob(model="tiny-llama", spec=estimate)


def run_sharded(job: ShardJob, *, workers: int) -> Any:
    """The outcome of ``job`` with ``workers`` local processes (sensitivity.estimate's sharded path)."""
    import dataclasses

    sharding = dataclasses.replace(job.sharding, workers=workers)
    return run_shards(ShardJob(model=job.model, spec=dataclasses.replace(job.spec, sharding=sharding)))


def _close(a: Any, b: Any, path: str = "") -> None:
    """Equal, floats (also inside lists / dicts) to round-off."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, a, b)
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple) and a and isinstance(a[0], float | int | list):
        np.testing.assert_allclose(np.asarray(b, dtype=float), np.asarray(a, dtype=float),
                                   rtol=1e-9, atol=1e-300, err_msg=path)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-300), path
    else:
        assert a == b, (path, a, b)


def assert_same_table(got: CostTable, ref: CostTable) -> None:
    a = ref.df.set_index(["unit", "option"]).sort_index()
    b = got.df.set_index(["unit", "option"]).sort_index()
    assert list(a.columns) == list(b.columns) and a.index.equals(b.index)
    for col in a.columns:
        if col in ("cost", "cost_std"):  # shards add their sums in another order: round-off
            np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-9, atol=1e-18)
        else:
            assert a[col].equals(b[col]), col
    _close({k: v for k, v in ref.metadata.items() if k not in RUN_KEYS},
           {k: v for k, v in got.metadata.items() if k not in RUN_KEYS})


@pytest.mark.parametrize(("method", "params"), CASES, ids=[
    m + ("-" + "-".join(f"{k}={v}" for k, v in p.items()) if p else "") for m, p in CASES])
def test_three_shards_merge_to_the_single_process_table(tmp_path: Path, method: str,
                                                        params: dict[str, Any]) -> None:
    ref = _reference(method, params)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    # two "workers" take one shard each and stop; the third run takes the last one and merges
    assert run_shard_worker(_spec(method, params, url, max_shards=1), 1) == 1
    assert run_shard_worker(_spec(method, params, url, max_shards=1), 2) == 1
    out = run_sharded(_spec(method, params, url), workers=1)
    assert out.table is not None and out.pending == () and out.measured == 1
    assert out.n_shards == N_SHARDS
    assert_same_table(out.table, ref)
    meta = out.table.metadata["sharded"]
    assert meta["by"] == "batch" and meta["storage"] == "sqlite" and meta["n_shards"] == N_SHARDS
    rows = q.shard_trials(url, "estimate-b")
    assert sorted(r["shard"] for r in rows if r["state"] == "COMPLETE") == list(range(N_SHARDS))
    again = run_sharded(_spec(method, params, url, n_shards=None), workers=1)  # merge only
    assert again.measured == 0 and again.table is not None
    assert_same_table(again.table, ref)


def test_seeds_by_local_batch_index_would_not_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a shard seeding its batches by their position in the shard
    (not their id in the calibration set) draws other cotangents than the single process."""
    from sensitivity import EstimateContext

    monkeypatch.setattr(EstimateContext, "batch_seed", lambda self, i: self.seed + i)
    ref = _reference("gauss-newton", {"probes": 1})  # the single process: local = global index
    out = run_sharded(_spec("gauss-newton", {"probes": 1}, None), workers=1)
    assert out.table is not None
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_same_table(out.table, ref)


def test_more_shards_than_batches_and_in_memory() -> None:
    ref = _reference("hessian-proxy", {})
    out = run_sharded(_spec("hessian-proxy", {}, None, n_shards=5), workers=1)
    assert out.table is not None and out.n_shards == 3  # 3 batches: empty shards are dropped
    assert_same_table(out.table, ref)


def test_not_batch_additive_is_refused() -> None:
    for method, params in (("hessian-eig", {}), ("hessian-trace", {}),
                           ("hessian-trace", {"curvature": "hessian"}), ("lim", {})):
        with pytest.raises(InvalidParameterError, match="not batch-additive"):
            EstimateSpec(method=method, params=params, sharding=Sharding())
    assert {"measured", "gauss-newton", "fisher", "salience", "hessian-proxy",
            "relevance"} <= set(sharded_methods())
    assert not {"hessian-eig", "hessian-trace", "datafree", "lim", "zd"} & set(sharded_methods())


def test_cli_shards_a_batch_additive_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from allocator.cli import main

    ref = _reference("gauss-newton", {"probes": 1})

    def argv(method: str, *extra: str) -> list[str]:
        return ["estimate", "tiny-llama", "--method", method, "--samples", "6", "--seq-len", "16",
                "--batch-size", "2", "--include", "model.layers.0", "--options", KW["options"],
                "--no-progress", *extra]

    out = tmp_path / "t.parquet"
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(argv("gauss-newton", "--param", "probes=1", "--storage", url, "--study", "cli",
                     "--shards", "2", "-o", str(out))) == 0
    assert "gauss-newton: 7 units × 2 options, 2 shards" in capsys.readouterr().out
    assert_same_table(CostTable.load(out), ref)
    assert main(argv("hessian-eig", "--workers", "2")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bitalloc estimate: error: --workers shards 'measured' (by unit) and the batch-additive "
        "estimators (by batch), not 'hessian-eig', whose statistics do not add over batches; "
        "drop --workers or use another --method")
