"""``fisher`` against per-sample gradients computed one unpadded sample at a time."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_bert, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._fisher import fisher_sample_costs  # noqa: E402
from sensitivity._loss import causal_lm_losses  # noqa: E402

OPTIONS = parse_options("int2..4-g8-asym,fp16")


def explicit_fisher_costs(model, batches, units) -> np.ndarray:
    """½ Σ_j (1/N Σ_s g_sj²) ΔW_j², each g_s from a forward of sample s alone (no padding)."""
    weights = [model.get_submodule(u.module).weight for u in units]
    f = [torch.zeros_like(unit_weight(model, u)) for u in units]
    n = 0
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            length = int(b["attention_mask"][r].sum())
            ids = b["input_ids"][r:r + 1, :length]
            logits = model(input_ids=ids, use_cache=False).logits
            loss = causal_lm_losses(logits, ids, None)[0]
            grads = torch.autograd.grad(loss, weights)
            for i, u in enumerate(units):
                g = grads[i] if u.columns is None else grads[i][:, u.columns[0]:u.columns[1]]
                f[i] += g**2
            n += 1
    out = np.empty((len(units), len(OPTIONS)))
    for i, u in enumerate(units):
        w = unit_weight(model, u).detach()
        for j, fmt in enumerate(OPTIONS):
            out[i, j] = 0.5 * float(((f[i] / n) * (fake_quantize(w, fmt) - w) ** 2).sum())
    return out


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_fisher_matches_explicit_per_sample_gradients(mode: str) -> None:
    model, batches = tiny_llama(), llama_batches()
    units = discover_units(model, group_columns=8)
    ctx = EstimateContext(batches=batches, units=units, options=OPTIONS, model_kind="causal_lm",
                          progress=False)
    table = get_estimator("fisher", target="empirical", per_sample=mode, chunk=2).estimate(model, ctx)
    cost = table.df["cost"].to_numpy().reshape(len(units), -1)
    np.testing.assert_allclose(cost, explicit_fisher_costs(model, batches, units), rtol=2e-4,
                               atol=1e-12)
    samples = fisher_sample_costs(model, ctx, per_sample=mode)
    assert samples.shape == (6, len(units), len(OPTIONS))
    std = table.df["cost_std"].to_numpy().reshape(len(units), -1)
    np.testing.assert_allclose(std, samples.std(0, ddof=1) / np.sqrt(6), rtol=1e-6, atol=1e-15)
    assert table.metadata["samples"] == 6


def test_fisher_encoder_contrastive_gradients() -> None:
    model = tiny_bert()
    ids = torch.randint(1, 31, (3, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    units = discover_units(model, exclude="pooler")
    ctx = EstimateContext(batches=[batch], units=units, options=OPTIONS, model_kind="encoder",
                          progress=False)
    cost = get_estimator("fisher", target="empirical").estimate(model, ctx).df
    assert (cost[cost["option"] == "int2-g8-asym"]["cost"] > 0).all()


def test_encoder_batch_of_one_is_refused() -> None:
    model = tiny_bert()
    batch = {"input_ids": torch.tensor([[2, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    ctx = EstimateContext(batches=[batch], units=discover_units(model), options=OPTIONS,
                          model_kind="encoder", progress=False)
    with pytest.raises(InvalidParameterError, match="≥ 2 texts"):
        get_estimator("fisher", target="empirical").estimate(model, ctx)
    # the model target needs no negatives: one text is a valid sample
    table = get_estimator("fisher").estimate(model, ctx)
    assert table.metadata["samples"] == 1 and (table.df["cost"] > 0).any()


def test_fisher_bad_parameters() -> None:
    with pytest.raises(InvalidParameterError, match="per_sample"):
        get_estimator("fisher", per_sample="all")
    with pytest.raises(InvalidParameterError, match="chunk"):
        get_estimator("fisher", chunk=0)
    with pytest.raises(InvalidParameterError, match="target"):
        get_estimator("fisher", target="labels")
    with pytest.raises(InvalidParameterError, match="probes"):
        get_estimator("fisher", probes=0)
