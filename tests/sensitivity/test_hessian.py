"""``hessian-trace`` / ``hessian-eig`` against the exact Hessian of a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_bert, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from sensitivity import EstimateContext, get_estimator, quant_errors  # noqa: E402
from sensitivity._hessian import hutchinson_traces, running_mean_converged  # noqa: E402
from sensitivity._hessian_eig import power_iteration  # noqa: E402
from sensitivity._hessian_trace import trace_flags  # noqa: E402
from sensitivity._loss import differentiable_attention, per_sample_losses  # noqa: E402


def _ctx(model, batches, **kw) -> EstimateContext:
    units = kw.pop("units", None) or discover_units(model, group_columns=kw.pop("groups", None))
    return EstimateContext(batches=batches, units=units, options=parse_options("int2..4-g8-asym,fp16"),
                           model_kind=kw.pop("kind", "causal_lm"), progress=False, **kw)


def exact_block_hessian(model, batches, unit, kind="causal_lm") -> torch.Tensor:
    """∂²L/∂W_i² of L = mean over all samples of ℓ_s, by torch.autograd.functional.hessian."""
    name = unit.module + ".weight"
    w0 = model.get_submodule(unit.module).weight.detach()
    lo, hi = unit.columns or (0, w0.shape[1])

    def loss(block: torch.Tensor) -> torch.Tensor:
        w = torch.cat([w0[:, :lo], block, w0[:, hi:]], dim=1)
        total, n = 0.0, 0
        for b in batches:
            with differentiable_attention(), torch.nn.utils.stateless._reparametrize_module(model, {name: w}):
                ls = per_sample_losses(model, b, kind)
            total = total + ls.sum()
            n += ls.numel()
        return total / n

    block = w0[:, lo:hi].clone()
    n = block.numel()
    return torch.autograd.functional.hessian(loss, block, vectorize=True).reshape(n, n)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(), llama_batches()


@pytest.fixture(scope="module")
def exact(llama):
    """Exact Hessian blocks of the 8-column-group units (whole modules are single groups)."""
    model, batches = llama
    units = discover_units(model, group_columns=8, include=r"v_proj|down_proj|lm_head")
    return units, [exact_block_hessian(model, batches, u) for u in units]


def test_trace_matches_exact_within_3_sigma(llama, exact) -> None:
    model, batches = llama
    units, hessians = exact
    ctx = _ctx(model, batches, units=units)  # down_proj (16 inputs) is split in 2 column groups
    samples, _ = hutchinson_traces(model, ctx, tol=0.0, max_probes=120, probes_per_round=40,
                                   probe_mode="vmap")
    assert samples.shape == (120, len(ctx.units))
    est = samples.mean(0)
    sem = samples.std(0, ddof=1) / np.sqrt(len(samples))
    assert any(u.columns is not None for u in units)
    for i, unit in enumerate(units):
        tr = float(hessians[i].trace())
        assert abs(est[i] - tr) <= 3 * sem[i] + 1e-6, (unit.name, est[i], tr, sem[i])


def test_trace_probe_modes_and_round_size_agree(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches)
    a, _ = hutchinson_traces(model, ctx, tol=0.0, max_probes=6, probes_per_round=6, probe_mode="loop")
    b, _ = hutchinson_traces(model, ctx, tol=0.0, max_probes=6, probes_per_round=4, probe_mode="vmap")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trace_stops_at_tolerance(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches)
    samples, _ = hutchinson_traces(model, ctx, tol=0.5, max_probes=100, probes_per_round=8)
    stop = running_mean_converged(samples, 0.5)
    assert stop == len(samples) < 100


def test_running_mean_rule() -> None:
    s = np.array([[1.0], [3.0], [2.0], [2.0]])  # means 1, 2, 2, 2
    assert running_mean_converged(s, 1e-3) == 3
    assert running_mean_converged(s[:2], 1e-3) is None


def test_trace_estimator_table_costs_and_std(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches)
    table = get_estimator("hessian-trace", curvature="hessian", max_probes=8, rel_sem=0).estimate(model, ctx)
    meta = table.metadata
    trace = np.asarray(meta["trace"])
    n = np.array([u.params for u in ctx.units])
    err = quant_errors(model, ctx.units, ctx.options)
    cost = table.df["cost"].to_numpy().reshape(len(ctx.units), -1)
    np.testing.assert_allclose(cost, np.maximum(trace, 0)[:, None] / n[:, None] * err, rtol=1e-9)
    assert (table.df["cost_std"] > 0).any() and meta["probes"] == 8
    fp16 = table.df[table.df["option"] == "fp16"]
    assert (fp16["cost"] < table.df[table.df["option"] == "int2-g8-asym"]["cost"].to_numpy()).all()


def test_eig_matches_eigvalsh(llama, exact) -> None:
    model, batches = llama
    units, hessians = exact
    ctx = _ctx(model, batches, units=units)
    lam, iters = power_iteration(model, ctx, max_iter=200, tol=1e-7)
    for i, unit in enumerate(units):
        ev = torch.linalg.eigvalsh(hessians[i])
        dominant = float(ev[ev.abs().argmax()])
        assert lam[i] == pytest.approx(dominant, rel=2e-3, abs=1e-5), (unit.name, iters[i])


def test_eig_estimator_cost_formula(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches)
    table = get_estimator("hessian-eig", max_iter=5).estimate(model, ctx)
    lam = np.abs(np.asarray(table.metadata["eigenvalue"]))
    n = np.array([u.params for u in ctx.units])
    err = quant_errors(model, ctx.units, ctx.options)
    cost = table.df["cost"].to_numpy().reshape(len(ctx.units), -1)
    np.testing.assert_allclose(cost, (lam / n)[:, None] * err, rtol=1e-9)
    assert max(table.metadata["iterations"]) <= 5


def test_encoder_loss_has_gradients_and_unused_pooler_scores_zero() -> None:
    model = tiny_bert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 31, (4, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ctx = _ctx(model, [batch], kind="encoder")
    samples, _ = hutchinson_traces(model, ctx, tol=0.0, max_probes=4)
    names = [u.name for u in ctx.units]
    trace = dict(zip(names, samples.mean(0), strict=True))
    assert trace["pooler.dense"] == 0.0  # the contrastive loss never uses the pooler
    assert all(abs(v) > 0 for k, v in trace.items() if k != "pooler.dense")
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_bad_parameters() -> None:
    with pytest.raises(InvalidParameterError, match="max_probes"):
        get_estimator("hessian-trace", max_probes=1)
    with pytest.raises(InvalidParameterError, match="probe_mode"):
        get_estimator("hessian-trace", probe_mode="fast")
    with pytest.raises(InvalidParameterError, match="curvature"):
        get_estimator("hessian-trace", curvature="exact")
    with pytest.raises(InvalidParameterError, match="tol"):
        get_estimator("hessian-eig", tol=-1)


def test_weights_untouched(llama) -> None:
    model, batches = llama
    ctx = _ctx(model, batches)
    before = [unit_weight(model, u).detach().clone() for u in ctx.units]
    get_estimator("hessian-trace", max_probes=2).estimate(model, ctx)
    get_estimator("hessian-trace", curvature="hessian", max_probes=2).estimate(model, ctx)
    for u, w in zip(ctx.units, before, strict=True):
        assert torch.equal(unit_weight(model, u), w)
        assert model.get_submodule(u.module).weight.grad is None


def test_trace_flags_record_negative_and_noisy_traces() -> None:
    flags = trace_flags(["a", "b", "c"], np.array([-1.0, 0.5, 3.0]), np.array([0.1, 0.4, 0.1]))
    assert flags["negative_traces"] == {"a": {"trace": -1.0, "sem": 0.1}}
    assert flags["noisy_traces"] == {"b": {"trace": 0.5, "sem": 0.4}}


def test_hessian_curvature_flags_negative_traces_in_metadata(caplog) -> None:
    # InfoNCE on a tiny BERT: an indefinite Hessian, and two probes leave most signs unresolved
    model = tiny_bert()
    ids = torch.randint(1, 31, (4, 7), generator=torch.Generator().manual_seed(0))
    ctx = _ctx(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], kind="encoder",
               units=discover_units(model, exclude="pooler"))
    with caplog.at_level("WARNING", logger="sensitivity._hessian_trace"):
        table = get_estimator("hessian-trace", curvature="hessian", max_probes=2).estimate(model, ctx)
    meta = table.metadata
    trace, sem = np.asarray(meta["trace"]), np.asarray(meta["trace_sem"])
    names = [u.name for u in ctx.units]
    assert set(meta["negative_traces"]) == {n for n, t in zip(names, trace, strict=True) if t < 0}
    assert set(meta["noisy_traces"]) == {
        n for n, t, s in zip(names, trace, sem, strict=True) if abs(t) < 2 * s}
    assert meta["negative_traces"] or meta["noisy_traces"]
    assert "hessian-trace:" in caplog.text and f"of {len(names)} task-loss" in caplog.text
    cost = table.df.pivot(index="unit", columns="option", values="cost")
    for name in meta["negative_traces"]:
        assert (cost.loc[name] == 0).all()
    assert (table.df["cost_std"] > 0).all()
