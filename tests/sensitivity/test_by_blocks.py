"""gauss-newton / fisher with the backward factored over the blocks of a model in memory
(sensitivity/_sequential_curvature.py): the table of the whole-model passes, tied heads included,
deltas under the budget, and the passes wherever the factoring would be wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format, parse_options  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.sequential import ResidentModel  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._deltas import delta_bytes  # noqa: E402

OPTIONS = [*parse_options("int2..4-g8-asym"), parse_format("int8-ch-sym"), parse_format("fp16")]


def _ctx(model: Any, units: Any, batches: Any = None) -> EstimateContext:
    return EstimateContext(batches=batches or llama_batches(vocab=40, rows=3, width=7, n=3), units=units,
                           options=OPTIONS, model_kind="causal_lm", seed=5, progress=False)


def _pair(name: str, model: Any, ctx: EstimateContext, **params: Any) -> tuple[Any, Any]:
    passes = get_estimator(name, probes=2, by_blocks=False, **params).estimate(model, ctx)
    blocks = get_estimator(name, probes=2, **params).estimate(model, ctx)
    return passes, blocks


def _same(a: Any, b: Any) -> None:
    assert list(a.df["unit"]) == list(b.df["unit"]) and list(a.df["option"]) == list(b.df["option"])
    np.testing.assert_allclose(b.df["cost"].to_numpy(), a.df["cost"].to_numpy(), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(b.df["cost_std"].to_numpy(), a.df["cost_std"].to_numpy(), rtol=1e-4,
                               atol=1e-12)
    assert b.metadata["samples"] == a.metadata["samples"]
    assert b.metadata["positions"] == a.metadata["positions"]


#: every sampled-curvature form the factored backward serves
FORMS = [("gauss-newton", {"correlations": "rows"}), ("gauss-newton", {"correlations": "unit"}),
         ("fisher", {})]


@pytest.mark.parametrize(("name", "params"), FORMS)
def test_same_table_as_the_passes(name: str, params: dict[str, Any]) -> None:
    model = tiny_llama(hidden=16, layers=3, vocab=40)
    units = discover_units(model, group_columns=8)  # column groups: a unit is a slice of its leaf
    passes, blocks = _pair(name, model, _ctx(model, units), **params)
    _same(passes, blocks)
    assert blocks.metadata["by_blocks"] is True and "passes" not in blocks.metadata
    assert passes.metadata["passes"] == 1


@pytest.mark.parametrize("correlations", ["rows", "unit"])
def test_tied_head_gets_the_embedding_s_share(correlations: str) -> None:
    """The tied head's gradient has two paths (the head and the embedding lookup): the factored
    backward adds the lookup's share, so the table equals the whole-model backward's."""
    model = tiny_llama(hidden=16, layers=2, vocab=40, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    units = discover_units(model)
    assert "lm_head" in [u.name for u in units]
    passes, blocks = _pair("gauss-newton", model, _ctx(model, units), correlations=correlations)
    _same(passes, blocks)
    assert blocks.metadata["by_blocks"] is True
    # without the lookup's share the head's cost would be another number
    head = blocks.df[blocks.df["unit"] == "lm_head"]["cost"].to_numpy()
    untied = tiny_llama(hidden=16, layers=2, vocab=40, tied=False)
    untied.load_state_dict(model.state_dict(), strict=False)
    untied.lm_head.weight.data.copy_(model.lm_head.weight.data)
    alone = get_estimator("gauss-newton", probes=2, correlations=correlations).estimate(
        untied, _ctx(untied, discover_units(untied)))
    assert not np.allclose(alone.df[alone.df["unit"] == "lm_head"]["cost"].to_numpy(), head, rtol=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_units_over_the_budget_go_in_row_pieces_with_the_same_table(tied: bool, monkeypatch: Any) -> None:
    """A budget below the head's deltas: the head (and a tied head's embedding share) in pieces,
    the block units in several groups; no delta tensor alive is over the budget."""
    import sensitivity._sequential_curvature as seqc

    model = tiny_llama(hidden=16, layers=2, vocab=40, tied=tied)
    units = discover_units(model)
    ctx = _ctx(model, units)
    head = next(u for u in units if u.name == "lm_head")
    budget = delta_bytes(head, OPTIONS) // 3 + 1
    held: list[int] = []
    real = seqc.weight_deltas

    def counted(*args: Any, **kwargs: Any) -> Any:
        d = real(*args, **kwargs)
        held.append(d.numel() * d.element_size())
        return d

    differentiated: list[tuple[int, ...]] = []
    grad = torch.autograd.grad

    def watched(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        differentiated.extend(tuple(t.shape) for t in inputs)
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(seqc, "weight_deltas", counted)
    passes = get_estimator("gauss-newton", probes=2, by_blocks=False,
                           delta_budget_mb=budget / 2**20).estimate(model, ctx)
    monkeypatch.setattr(torch.autograd, "grad", watched)
    blocks = get_estimator("gauss-newton", probes=2, delta_budget_mb=budget / 2**20).estimate(model, ctx)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    _same(passes, blocks)
    assert held and max(held) <= budget
    # the head's gradient is formed piece by piece, never as a whole vocabulary-wide tensor
    assert differentiated and tuple(model.lm_head.weight.shape) not in differentiated
    one = get_estimator("gauss-newton", probes=2).estimate(model, ctx)
    assert blocks.metadata["stage_reruns"] > one.metadata["stage_reruns"]


class _ScaledHead(torch.nn.Linear):
    """A head that is not a plain ``nn.Linear``: its gradient must come from autograd."""

    def forward(self, x: Any) -> Any:
        return super().forward(x) * 1.5


@pytest.mark.parametrize("tied", [False, True])
def test_a_head_that_is_not_a_plain_linear_is_differentiated(tied: bool) -> None:
    model = tiny_llama(hidden=16, layers=2, vocab=40, tied=tied)
    old = model.lm_head
    model.lm_head = _ScaledHead(old.in_features, old.out_features, bias=False)
    model.lm_head.weight = old.weight  # keeps the tie
    units = discover_units(model)
    head = next(u for u in units if u.name == "lm_head")
    passes, blocks = _pair("gauss-newton", model, _ctx(model, units), correlations="unit",
                           delta_budget_mb=(delta_bytes(head, OPTIONS) // 2 + 1) / 2**20)
    _same(passes, blocks)
    assert blocks.metadata["by_blocks"] is True


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 6), out=st.integers(1, 9), width=st.integers(1, 5), data=st.data())
def test_linear_weight_rows_are_autograd_s_rows(tokens: int, out: int, width: int, data: Any) -> None:
    from sensitivity._sequential_curvature import linear_weight_rows

    lo = data.draw(st.integers(0, out - 1))
    hi = data.draw(st.integers(lo + 1, out))
    gen = torch.Generator().manual_seed(tokens * 100 + out * 10 + width)
    x = torch.randn(1, tokens, width, generator=gen)
    v = torch.randn(1, tokens, out, generator=gen)
    head = torch.nn.Linear(width, out)
    (want,) = torch.autograd.grad(head(x), [head.weight], grad_outputs=v)
    torch.testing.assert_close(linear_weight_rows(v, x, lo, hi), want[lo:hi], rtol=1e-5, atol=1e-6)


#: the forms whose term squares the gradient before summing it over a unit: not additive in paths
SQUARED_FORMS = [("fisher", {}), ("gauss-newton", {"correlations": "rows"})]


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize(("name", "params"), SQUARED_FORMS)
def test_fisher_with_a_tied_head_gets_the_whole_gradient_squared(pieces: bool, name: str,
                                                                  params: dict[str, Any]) -> None:
    """The diagonal Fisher (and GN's row blocks) square the summed gradient of both paths (head
    and lookup): the factored backward keeps the head's gradient at each row's tokens and adds
    ``term(g_h + g_e) − term(g_h)`` on them, so the table is the whole-model backward's, with the
    head whole or in row pieces."""
    model = tiny_llama(hidden=16, layers=2, vocab=40, tied=True)
    units = discover_units(model)
    head = next(u for u in units if u.name == "lm_head")
    budget = {"delta_budget_mb": (delta_bytes(head, OPTIONS) // 3 + 1) / 2**20} if pieces else {}
    passes, blocks = _pair(name, model, _ctx(model, units), **budget, **params)
    _same(passes, blocks)
    assert blocks.metadata["by_blocks"] is True
    # the head's square alone (the lookup's share left out) is another number
    untied = tiny_llama(hidden=16, layers=2, vocab=40, tied=False)
    untied.load_state_dict(model.state_dict(), strict=False)
    untied.lm_head.weight.data.copy_(model.lm_head.weight.data)
    alone = get_estimator(name, probes=2, **params).estimate(untied, _ctx(untied, discover_units(untied)))
    cost = blocks.df[blocks.df["unit"] == "lm_head"]["cost"].to_numpy()
    assert not np.allclose(alone.df[alone.df["unit"] == "lm_head"]["cost"].to_numpy(), cost, rtol=1e-3)


@pytest.mark.parametrize(("name", "params"), SQUARED_FORMS)
def test_fisher_with_a_tied_head_that_is_not_a_plain_linear_takes_the_passes(
        name: str, params: dict[str, Any]) -> None:
    """Without a plain Linear head the head's gradient at the row's tokens is not kept: the
    whole-model passes run, and the table says why."""
    model = tiny_llama(hidden=16, layers=2, vocab=40, tied=True)
    old = model.lm_head
    model.lm_head = _ScaledHead(old.in_features, old.out_features, bias=False)
    model.lm_head.weight = old.weight  # keeps the tie
    ctx = _ctx(model, discover_units(model))
    table = get_estimator(name, probes=2, **params).estimate(model, ctx)
    assert "not linear in the gradient" in table.metadata["by_blocks"] and table.metadata["passes"] == 1
    passes = get_estimator(name, probes=2, by_blocks=False, **params).estimate(model, ctx)
    np.testing.assert_array_equal(table.df["cost"].to_numpy(), passes.df["cost"].to_numpy())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), out=st.integers(2, 9), width=st.integers(1, 5), data=st.data())
def test_linear_weight_at_is_autograd_s_rows(n: int, out: int, width: int, data: Any) -> None:
    from sensitivity._sequential_curvature import linear_weight_at

    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, out, bias=False)
    x = torch.randn(1, n, width, generator=gen)
    v = torch.randn(1, n, out, generator=gen)
    rows = torch.tensor(sorted(data.draw(st.sets(st.integers(0, out - 1), min_size=1))))
    (want,) = torch.autograd.grad(head(x), [head.weight], grad_outputs=v)
    torch.testing.assert_close(linear_weight_at(v, x, rows), want[rows], rtol=1e-5, atol=1e-6)


def test_outputs_the_blocks_do_not_reproduce_take_the_passes() -> None:
    """Logits changed outside the blocks, norm and head (here: scaled after the head) cannot be
    factored: the passes run and the table says why."""
    import transformers

    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = 2.0 * out.logits
            return out

    base = tiny_llama(hidden=16, layers=2, vocab=40)
    model = Scaled(base.config).eval()
    model.load_state_dict(base.state_dict())
    table = get_estimator("gauss-newton", probes=2).estimate(model, _ctx(model, discover_units(model)))
    assert "do not reproduce" in table.metadata["by_blocks"]


def test_a_tied_embedding_that_is_not_block_0_s_input_takes_the_passes() -> None:
    """Gemma scales the lookup by √hidden before block 0: the lookup's gradient is not
    Σ onehot · δ₀ there, so the passes run."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    model = transformers.GemmaForCausalLM(cfg).eval()
    ctx = _ctx(model, discover_units(model))
    table = get_estimator("gauss-newton", probes=2).estimate(model, ctx)
    assert "not the tied embedding's lookup" in table.metadata["by_blocks"]
    passes = get_estimator("gauss-newton", probes=2, by_blocks=False).estimate(model, ctx)
    np.testing.assert_array_equal(table.df["cost"].to_numpy(), passes.df["cost"].to_numpy())


def test_units_outside_the_blocks_take_the_passes() -> None:
    from _tiny import tiny_bert

    model = tiny_bert()
    units = discover_units(model)  # the pooler is neither a block nor an output head
    ctx = EstimateContext(batches=llama_batches(vocab=31, rows=2, width=6, n=1), units=units, options=OPTIONS,
                          model_kind="encoder", seed=0, progress=False)
    table = get_estimator("gauss-newton", probes=1).estimate(model, ctx)
    assert "neither in a block nor the output head" in table.metadata["by_blocks"]
    inner = [u for u in units if "pooler" not in u.name]
    passes, blocks = _pair("gauss-newton", model, ctx.__class__(**{**ctx.__dict__, "units": inner}))
    _same(passes, blocks)


def test_resident_model_runs_the_blocks_it_holds() -> None:
    model = tiny_llama(hidden=16, layers=3, vocab=40, tied=True)
    seq = ResidentModel(model, kind="causal_lm")
    assert seq.block_names == [f"model.layers.{i}" for i in range(3)] and seq.head_name == "lm_head"
    assert seq.tied_head() and seq.load_block(1) is model.model.layers[1]
    batches = llama_batches(vocab=40, rows=3, width=7, n=2)
    steps = list(seq.steps(batches))
    assert len(steps) == 3 and len(seq.final_inputs) == 2
    with torch.no_grad():
        want = model(**batches[1]).logits
        got = model.lm_head(seq.head_inputs()[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_by_blocks_must_be_a_bool(bad: Any) -> None:
    for name in ("gauss-newton", "fisher"):
        with pytest.raises(InvalidParameterError, match="by_blocks must be true or false"):
            get_estimator(name, by_blocks=bad)
