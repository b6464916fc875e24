"""``hessian-trace`` probes until the per-unit standard error meets ``rel_sem`` (issue 13).

A probe is one i.i.d. draw of every unit's trace over the whole calibration set: a Rademacher
vector on the task-loss Hessian, or one pass of output cotangents for the Gauss–Newton form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_bert, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from sensitivity import ESTIMATORS, EstimateContext, get_estimator, quant_errors  # noqa: E402
from sensitivity._hessian import ProbeRule, hutchinson_traces, trace_and_sem  # noqa: E402
from sensitivity._hessian_trace import gn_trace_probes, pass_seed  # noqa: E402

OPTIONS = parse_options("int2..4-g8-asym")


def _ctx(model, batches, *, kind: str = "causal_lm", seed: int = 0, **units) -> EstimateContext:
    return EstimateContext(batches=batches, units=discover_units(model, **units), options=OPTIONS,
                           model_kind=kind, seed=seed, progress=False)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(), llama_batches()


@pytest.fixture(scope="module")
def infonce():
    """InfoNCE on a tiny BERT: an indefinite Hessian whose traces sit near 0 (high variance)."""
    model = tiny_bert()
    ids = torch.randint(1, 31, (4, 7), generator=torch.Generator().manual_seed(0))
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _matrix(table, col: str = "cost") -> np.ndarray:
    return table.df[col].to_numpy().reshape(table.n_units, -1)


# ------------------------------------------------------------------ the rule on its own
def test_rule_on_synthetic_draws() -> None:
    rule = ProbeRule(rel_sem=0.05, min_probes=8, max_probes=20)
    steady = np.ones((8, 3)) + 1e-3 * np.arange(8)[:, None]  # SEM ≪ 5 % of the trace
    assert rule.done(steady) and rule.converged(steady).all()
    assert not rule.done(steady[:7])  # below min_probes the rule is not checked
    noisy = np.array([[1.0, 1.0], [-1.0, 1.0]] * 5)  # unit 0: mean 0, SEM > 0 → never converges
    assert rule.converged(noisy).tolist() == [False, True] and not rule.done(noisy)
    assert rule.done(np.vstack([noisy] * 2))  # … until the cap
    fixed = ProbeRule(rel_sem=0.0, min_probes=2, max_probes=5)
    assert not fixed.done(steady[:4]) and fixed.done(steady[:5])
    # an exact-zero trace (a unit the output never reaches) counts as converged
    assert rule.converged(np.zeros((8, 1))).all()
    trace, sem = trace_and_sem(noisy)
    np.testing.assert_allclose(sem, noisy.std(0, ddof=1) / math.sqrt(10))
    assert trace_and_sem(np.ones((1, 2)))[1].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ (a) early stop vs the cap
def test_low_variance_stops_early(llama) -> None:
    model, batches = llama
    # down_proj / lm_head GN traces: per-pass relative spread ≈ 0.2–0.25, so 8 passes give ≈ 8 %
    ctx = _ctx(model, batches, include=r"down_proj|lm_head")
    table = get_estimator("hessian-trace", rel_sem=0.15, max_probes=100).estimate(model, ctx)
    meta = table.metadata
    assert meta["probes"] == 8 == meta["output_probes"]  # min_probes, far below the cap
    assert all(meta["converged"].values()) and meta["capped_units"] == []
    trace, sem = np.asarray(meta["trace"]), np.asarray(meta["trace_sem"])
    assert (sem <= 0.15 * trace).all()
    assert meta["samples"] == 6 and meta["rel_sem"] == 0.15


def test_high_variance_runs_to_the_cap_and_warns(infonce, caplog) -> None:
    model, batches = infonce
    ctx = _ctx(model, batches, kind="encoder", exclude="pooler")
    with caplog.at_level("WARNING", logger="sensitivity._hessian_trace"):
        table = get_estimator("hessian-trace", curvature="hessian", rel_sem=0.05,
                              max_probes=12).estimate(model, ctx)
    meta = table.metadata
    assert meta["probes"] == 12
    capped = meta["capped_units"]
    assert capped and set(capped) == {u for u, ok in meta["converged"].items() if not ok}
    msg = next(r.getMessage() for r in caplog.records if "max_probes=12" in r.getMessage())
    assert all(u in msg for u in capped) and "raise max_probes" in msg and "\n" not in msg


def test_min_probes_is_respected_and_rounds_are_kept(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches, include="lm_head")
    # a loose target holds at once: the probes stop at min_probes, rounded up to a whole round
    meta = get_estimator("hessian-trace", rel_sem=0.9, min_probes=5, probes=2).estimate(
        model, ctx).metadata
    assert meta["probes"] == 6 and meta["min_probes"] == 5
    meta = get_estimator("hessian-trace", curvature="hessian", rel_sem=0.9, min_probes=3,
                         probes_per_round=1).estimate(model, ctx).metadata
    assert meta["probes"] == 3


def test_rel_sem_zero_runs_exactly_max_probes(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches, include=r"down_proj|lm_head")
    for kw in ({}, {"curvature": "hessian"}):
        meta = get_estimator("hessian-trace", rel_sem=0, max_probes=11, **kw).estimate(
            model, ctx).metadata
        assert meta["probes"] == 11 and meta["converged"] == {} and meta["capped_units"] == []


# ------------------------------------------------------------------ (b) cost_std is the SEM
@pytest.mark.parametrize("curvature", ["gauss-newton", "hessian"])
def test_cost_std_is_the_sem_of_the_probes(llama, curvature) -> None:
    model, batches = llama
    ctx = _ctx(model, batches)
    est = get_estimator("hessian-trace", curvature=curvature, rel_sem=0.3, max_probes=20)
    table = est.estimate(model, ctx)
    meta = table.metadata
    rule = ProbeRule(rel_sem=0.3, min_probes=8, max_probes=20)
    if curvature == "gauss-newton":
        draws = gn_trace_probes(model, ctx, rule, per_round=2).samples
    else:
        draws, _ = hutchinson_traces(model, ctx, rel_sem=0.3, min_probes=8, max_probes=20)
    assert draws.shape == (meta["probes"], len(ctx.units))
    sem = draws.std(0, ddof=1) / math.sqrt(draws.shape[0])
    np.testing.assert_allclose(meta["trace"], draws.mean(0), rtol=1e-12)
    np.testing.assert_allclose(meta["trace_sem"], sem, rtol=1e-12)
    n = np.array([u.params for u in ctx.units], dtype=np.float64)
    err = quant_errors(model, ctx.units, ctx.options)
    np.testing.assert_allclose(_matrix(table, "cost_std"), (sem / n)[:, None] * err, rtol=1e-9)
    assert (_matrix(table, "cost_std") > 0).all()


# ------------------------------------------------------------------ (c) bad parameters
@pytest.mark.parametrize(("params", "match"), [
    ({"rel_sem": -0.1}, r"rel_sem must be a number in \[0, 1\).*got -0\.1"),
    ({"rel_sem": 1.5}, r"rel_sem .* got 1\.5"),
    ({"rel_sem": float("nan")}, r"rel_sem .* got nan"),
    ({"rel_sem": True}, r"rel_sem .* got True"),
    ({"rel_sem": "0.05"}, r"rel_sem .* got '0\.05'"),
    ({"min_probes": 1}, r"min_probes must be an int ≥ 2 \(a standard error needs two probes\), "
                        r"got 1"),
    ({"min_probes": 8.0}, r"min_probes must be an int ≥ 2.*got 8\.0"),
    ({"max_probes": 1}, r"max_probes must be an int ≥ 2.*got 1"),
    ({"min_probes": 20, "max_probes": 10},
     r"min_probes=20 is above max_probes=10; raise max_probes or lower min_probes"),
    ({"probes_per_round": 0}, r"probes_per_round must be an int ≥ 1, got 0"),
    ({"chunk": 0}, r"chunk must be an int ≥ 1 \(rows per forward\), got 0"),
])
def test_bad_parameters_are_rejected_in_one_line(params, match) -> None:
    with pytest.raises(InvalidParameterError, match=match) as info:
        get_estimator("hessian-trace", **params)
    assert "\n" not in str(info.value)


def test_a_small_cap_lowers_the_default_minimum() -> None:
    # max_probes=2 (a quick run) is valid without spelling out min_probes
    assert get_estimator("hessian-trace", max_probes=2).params()["min_probes"] == 2
    assert get_estimator("hessian-trace").params()["min_probes"] == 8
    assert ESTIMATORS["hessian-trace"] == "sensitivity._hessian_trace:HessianTraceEstimator"
    assert ESTIMATORS["hessian-eig"] == "sensitivity._hessian_eig:HessianEigEstimator"


# ------------------------------------------------------------------ (d) determinism
@pytest.mark.parametrize("curvature", ["gauss-newton", "hessian"])
def test_seeded_runs_reproduce_and_seeds_differ(llama, curvature) -> None:
    model, batches = llama
    kw = {"curvature": curvature, "rel_sem": 0.2, "max_probes": 24}
    a = get_estimator("hessian-trace", **kw).estimate(model, _ctx(model, batches, seed=5))
    b = get_estimator("hessian-trace", **kw).estimate(model, _ctx(model, batches, seed=5))
    c = get_estimator("hessian-trace", **kw).estimate(model, _ctx(model, batches, seed=6))
    assert a.fingerprint == b.fingerprint and a.metadata["probes"] == b.metadata["probes"]
    np.testing.assert_array_equal(_matrix(a, "cost_std"), _matrix(b, "cost_std"))
    assert not np.allclose(_matrix(a), _matrix(c))


def test_gn_passes_do_not_depend_on_round_size_chunk_or_mode(llama) -> None:
    # pass p draws from its own generator (seed, p): the same probes however they are batched
    model, batches = llama
    ctx = _ctx(model, batches, include=r"v_proj|lm_head")
    rule = ProbeRule(rel_sem=0.0, min_probes=2, max_probes=5)
    a = gn_trace_probes(model, ctx, rule, per_round=2, chunk=1, per_sample="loop").samples
    b = gn_trace_probes(model, ctx, rule, per_round=5, chunk=3, per_sample="vmap").samples
    c = gn_trace_probes(model, ctx, rule, per_round=1, chunk=2, per_sample="auto").samples
    assert a.shape == (5, 2)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5)
    assert len({pass_seed(0, p) for p in range(100)}) == 100 and pass_seed(0, 1) != pass_seed(1, 1)
