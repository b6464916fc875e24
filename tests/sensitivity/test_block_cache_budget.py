"""BlockCache under a memory budget: only every stride-th block's outputs kept, the same outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity._activation_cache import BlockCache, block_stride, make_chunks  # noqa: E402


@given(n=st.integers(1, 200), per=st.floats(1.0, 1e9), budget=st.integers(0, 10**11))
def test_block_stride_is_the_smallest_that_fits(n: int, per: float, budget: int) -> None:
    s = block_stride(n, per, budget)
    affordable = int(budget // per)
    if s == 0:
        assert affordable == 0
        return
    assert n // s * per <= budget  # the kept blocks fit
    if s > 1:
        assert n // (s - 1) > affordable  # a smaller stride would not


def test_block_stride_examples() -> None:
    mb = 2**20
    assert block_stride(30, 7.08 * mb, 128 * mb) == 2  # SmolLM2's 24 fit samples: 15 of 30 kept
    assert block_stride(30, 7.08 * mb, 512 * mb) == 1
    assert block_stride(10, 1.0, 3) == 3  # blocks 2, 5, 8
    assert block_stride(10, 1.0, 0) == 0


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 9, 5])[:, None]).long()
    return [{"input_ids": torch.randint(3, 97, (3, 12), generator=g) * mask, "attention_mask": mask}
            for _ in range(2)]


@pytest.mark.parametrize("keep", [6, 2, 1, 0])
def test_replays_under_a_budget_give_the_full_caches_outputs(keep: int) -> None:
    model = _llama()
    chunks = make_chunks(_batches(), max_tokens=18)
    full = BlockCache(model, chunks, kind="causal_lm")
    per_block = sum(o[0].numel() * 4 if isinstance(o, tuple) else o.numel() * 4
                    for outs in full.block_out for o in outs[:1])
    budget = BlockCache(model, chunks, kind="causal_lm", max_bytes=keep * per_block)
    stride = block_stride(6, per_block, keep * per_block)
    assert budget.kept == [stride > 0 and (k + 1) % stride == 0 for k in range(6)]
    assert sum(budget.kept) <= keep
    assert all((o is None) != kept for outs in budget.block_out
               for o, kept in zip(outs, budget.kept, strict=True))
    # a unit of block 3 moved: every start up to its block replays to the same outputs
    unit = next(u for u in discover_units(model) if u.module.startswith("model.layers.3."))
    w = unit_weight(model, unit)
    orig = w.detach().clone()
    with torch.no_grad():
        w.copy_(fake_quantize(orig, parse_format("int2-g16-asym")))
    try:
        with torch.inference_mode():
            for ci in range(len(full.chunks)):
                for start in range(0, 4):
                    assert torch.equal(budget.outputs_from(ci, start), full.outputs_from(ci, start))
                assert torch.equal(budget.block_output(ci, 3), full.block_output(ci, 3))
    finally:
        with torch.no_grad():
            w.copy_(orig)
    for ci in range(len(full.chunks)):  # the reference outputs do not depend on the budget
        assert torch.equal(budget.reference[ci], full.reference[ci])


def test_a_block_not_kept_is_refused_by_name() -> None:
    model = _llama()
    cache = BlockCache(model, make_chunks(_batches(), max_tokens=18), kind="causal_lm", max_bytes=0)
    assert not any(cache.kept)
    with pytest.raises(InvalidParameterError, match="block 2's output is not in the cache"):
        cache.cached_block_output(0, 2)
    with pytest.raises(InvalidParameterError, match="max_bytes"):
        BlockCache(model, make_chunks(_batches(), max_tokens=18), kind="causal_lm", max_bytes=-1)
