"""``measured`` fast path (several options per forward) equals the one-option-per-forward loop;
the opt-in ``block-gain`` / ``unit-gain`` approximations are exact at their reference trials
and restore the weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.outputs import forward_outputs  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._measured import measure_units  # noqa: E402
from tests.roundoff import assert_close, mean_std_atol, output_roundoff, quadratic_atol  # noqa: E402

OPTIONS = "int2..5-g128-asym,int8-g128-asym"


def tiny_llama(tie: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ((12, 9, 12, 5), (7, 12, 3, 10), (11, 4, 8, 12)):
        ids = torch.randint(3, 61, (4, 12), generator=g)
        mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def roundoff(model: torch.nn.Module, ctx: EstimateContext, width: int) -> float:
    """ρ of the outputs (tests/roundoff.py): unit embeddings, or logits at their largest size."""
    if ctx.model_kind == "encoder":
        return output_roundoff(width)
    with torch.inference_mode():
        scale = max(float(forward_outputs(model, b, ctx.model_kind).abs().max()) for b in ctx.batches)
    return output_roundoff(width, scale)


def assert_same_rows(a, b, rho: float, n_batches: int, *, batch_means: bool = True) -> None:
    """``a`` and ``b`` (MeasuredRows) agree to rel 1e-4 (cost_std 1e-3) above the float32 floor."""
    assert_close(a.cost, b.cost, rtol=1e-4, atol=quadratic_atol(b.cost, rho))
    assert_close(a.cost_std, b.cost_std, rtol=1e-3, atol=mean_std_atol(b.cost, n_batches, rho))
    if batch_means:
        assert_close(a.batch_means, b.batch_means, rtol=1e-4, atol=quadratic_atol(b.batch_means, rho))


def ctx_for(model: torch.nn.Module, kind: str) -> EstimateContext:
    return EstimateContext(batches=batches(), units=discover_units(model),
                           options=parse_options(OPTIONS), model_kind=kind, progress=False)


# float32 forwards of other batch shapes round differently; the distortions are float64 sums
# of those outputs, so the two paths agree to float32 round-off amplified by the cancellation
# in a small distortion (the same tolerance as the direct-evaluation tests of test_measured.py).
@pytest.mark.parametrize(("make", "kind"), [(lambda: tiny_llama(False), "causal_lm"),
                                            (lambda: tiny_llama(True), "causal_lm"),
                                            (tiny_bert, "encoder")])
def test_batched_options_equal_the_reference_loop(make, kind: str) -> None:
    model = make()
    ctx = ctx_for(model, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # max_tokens small enough that the largest chunks fit fewer options per pass than the rest.
    fast = measure_units(model, ctx, max_tokens=150)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = measure_units(model, ctx, max_tokens=150, batch_options=False)
    assert_same_rows(fast, ref, roundoff(model, ctx, 32), len(ctx.batches))
    assert fast.info["forwards"] == pytest.approx(ref.info["forwards"])
    assert (fast.cost[:, 0] > 0).all() or kind == "encoder"  # BERT's pooler feeds no embedding


def test_quantized_copies_under_their_budget_give_the_same_table(monkeypatch) -> None:
    """A unit whose quantized copies exceed QUANTIZED_BUDGET_BYTES is measured a few options at a
    time (here one: 8-byte budget); the table is that of all options at once."""
    import sensitivity._measured as measured

    model = tiny_llama(False)
    ctx = ctx_for(model, "causal_lm")
    whole = measure_units(model, ctx, max_tokens=150)
    monkeypatch.setattr(measured, "QUANTIZED_BUDGET_BYTES", 8)
    grouped = measure_units(model, ctx, max_tokens=150)
    assert_same_rows(grouped, whole, roundoff(model, ctx, 32), len(ctx.batches), batch_means=False)
    assert grouped.info["forwards"] == pytest.approx(whole.info["forwards"])


def test_module_without_batch_first_input_falls_back() -> None:
    """A unit whose module sees flattened rows cannot tell option copies apart: one per pass."""
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            b, t, d = h.shape
            return h + torch.tanh(self.fc(h.reshape(b * t, d))).reshape(b, t, d)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 8)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(8, 5)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.emb(input_ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(h)

    model = Net().eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 11, (3, 5), generator=g),
             "attention_mask": torch.ones(3, 5, dtype=torch.long)} for _ in range(2)]
    ctx = EstimateContext(batches=data, units=discover_units(model),
                          options=parse_options("int2-g128-asym,int4-g128-asym"),
                          model_kind="classifier", progress=False)
    fast = measure_units(model, ctx)
    ref = measure_units(model, ctx, batch_options=False)
    assert_close(fast.cost, ref.cost, rtol=1e-5, atol=quadratic_atol(ref.cost, roundoff(model, ctx, 8)))


def test_block_gain_is_opt_in_and_exact_at_its_reference() -> None:
    model = tiny_llama(False)
    ctx = ctx_for(model, "causal_lm")
    exact = get_estimator("measured").estimate(model, ctx)
    assert "approx" not in exact.metadata
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = measure_units(model, ctx, approx="block-gain")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = measure_units(model, ctx)
    assert sorted(rows.info["block_gains"]) == [0, 1, 2]
    mid = len(ctx.options) // 2
    names = [u.module for u in ctx.units]
    for k in range(3):  # the first unit of every block at the middle option is measured exactly
        i = next(i for i, n in enumerate(names) if n.startswith(f"model.layers.{k}."))
        assert rows.cost[i, mid] == pytest.approx(ref.cost[i, mid], rel=1e-6)
    head = names.index("lm_head")
    np.testing.assert_allclose(rows.cost[head], ref.cost[head], rtol=1e-6)  # outside the blocks
    assert rows.info["forwards"] < ref.info["forwards"]
    assert (rows.cost >= 0).all() and np.isfinite(rows.cost_std).all()
    table = get_estimator("measured", approx="block-gain").estimate(model, ctx)
    assert table.metadata["approx"] == "block-gain"
    unit = measure_units(model, ctx, approx="unit-gain")  # exact at the middle option of every unit
    assert_close(unit.cost[:, mid], ref.cost[:, mid], rtol=1e-4,
                 atol=quadratic_atol(ref.cost[:, mid], roundoff(model, ctx, 32)))
    np.testing.assert_allclose(unit.cost[head], ref.cost[head], rtol=1e-6)
    assert unit.info["forwards"] < ref.info["forwards"] and (unit.cost >= 0).all()
    with pytest.raises(InvalidParameterError, match="approx"):
        get_estimator("measured", approx="taylor")
    with pytest.raises(InvalidParameterError, match="batch_options"):
        get_estimator("measured", batch_options=1)
