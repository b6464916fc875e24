"""Quantization deltas under a memory budget (sensitivity/_deltas.py): the units are split into
the fewest balanced groups whose float32 deltas fit ``delta_budget_mb``, one pass over the data
each, and the gauss-newton and fisher tables do not depend on the split."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format, parse_options  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._curvature.split import row_pieces  # noqa: E402
from sensitivity._deltas import (  # noqa: E402
    delta_bytes,
    delta_groups,
    quant_deltas,  # noqa: E402
)

OPTIONS = [*parse_options("int2..4-g8-asym"), parse_format("int3-g5-sym"), parse_format("int8-ch-sym"),
           parse_format("q4_K"), parse_format("fp16"), parse_format("bf16")]


@pytest.fixture(scope="module")
def llama():
    model, batches = tiny_llama(hidden=12, layers=2), llama_batches()
    units = discover_units(model, group_columns=8, include=r"q_proj|v_proj|down_proj|lm_head")
    return model, batches, units


def _ctx(model, batches, units, options=OPTIONS) -> EstimateContext:
    return EstimateContext(batches=batches, units=units, options=options, model_kind="causal_lm",
                           seed=3, progress=False)


def _matrix(table, column: str = "cost") -> np.ndarray:
    return table.df[column].to_numpy().reshape(table.n_units, -1)


def test_deltas_are_the_quantizer_s_and_sized_as_counted(llama) -> None:
    model, batches, units = llama
    ctx = _ctx(model, batches, units)
    deltas, squares = quant_deltas(model, ctx), quant_deltas(model, ctx, squared=True)
    for unit, d, d2 in zip(units, deltas, squares, strict=True):
        assert d.numel() * d.element_size() == delta_bytes(unit, OPTIONS)
        w = model.get_submodule(unit.module).weight.detach()
        w = w if unit.columns is None else w[:, unit.columns[0]:unit.columns[1]]
        for o, fmt in enumerate(OPTIONS):
            assert torch.equal(d[o], fake_quantize(w, fmt) - w)
        assert torch.equal(d2, d * d)


def test_groups_are_the_fewest_that_fit_and_balanced(llama) -> None:
    _, _, units = llama
    sizes = [delta_bytes(u, OPTIONS) for u in units]
    budget = sum(sizes) // 2 + max(sizes)
    groups = delta_groups(units, OPTIONS, budget)
    assert [i for g in groups for i in g] == list(range(len(units)))
    assert len(groups) == 2 and all(sum(sizes[i] for i in g) <= budget for g in groups)
    # balanced: the larger group is no bigger than half the total plus one unit
    assert max(sum(sizes[i] for i in g) for g in groups) <= sum(sizes) / 2 + max(sizes)
    assert delta_groups(units, OPTIONS, 1) == [[i] for i in range(len(units))]
    assert delta_groups(units, OPTIONS, sum(sizes)) == [list(range(len(units)))]


@pytest.mark.parametrize("method", ["gauss-newton", "fisher"])
def test_tables_do_not_depend_on_the_passes(llama, method) -> None:
    model, batches, units = llama
    ctx = _ctx(model, batches, units)
    one = get_estimator(method, probes=1, by_blocks=False).estimate(model, ctx)
    many = get_estimator(method, probes=1, delta_budget_mb=1e-6, by_blocks=False).estimate(model, ctx)
    # every unit is over the budget: one pass per output row of each
    assert one.metadata["passes"] == 1 and many.metadata["passes"] == sum(u.shape[0] for u in units)
    np.testing.assert_allclose(_matrix(many), _matrix(one), rtol=1e-6, atol=0)
    np.testing.assert_allclose(_matrix(many, "cost_std"), _matrix(one, "cost_std"), rtol=1e-5)


@pytest.mark.parametrize(("method", "mode"), [("gauss-newton", "vmap"), ("gauss-newton", "loop"),
                                           ("fisher", "auto")])
def test_units_over_the_budget_are_split_by_rows_with_the_same_table(llama, method, mode) -> None:
    """Units whose deltas alone exceed the budget are measured in row pieces whose linear parts
    are summed per (sample, probe) before the square (GN), so the table is unchanged."""
    model, batches, units = llama
    ctx = _ctx(model, batches, units)
    sizes = [delta_bytes(u, OPTIONS) for u in units]
    budget = max(sizes) // 3 + 1
    big = [u for u, b in zip(units, sizes, strict=True) if b > budget]
    small = [u for u, b in zip(units, sizes, strict=True) if b <= budget]
    pieces = [row_pieces(u, OPTIONS, budget) for u in big]
    assert big and small and max(len(p) for p in pieces) >= 3
    for unit, p in zip(big, pieces, strict=True):  # contiguous, covering, each under the budget
        assert p[0][0] == 0 and p[-1][1] == unit.shape[0]
        assert all(a[1] == b[0] for a, b in zip(p, p[1:], strict=False))
        assert all(delta_bytes(unit, OPTIONS) * (hi - lo) / unit.shape[0] <= budget for lo, hi in p)
    one = get_estimator(method, probes=2, per_sample=mode, by_blocks=False).estimate(model, ctx)
    split = get_estimator(method, probes=2, per_sample=mode, by_blocks=False,
                          delta_budget_mb=budget / 2**20).estimate(model, ctx)
    assert split.metadata["passes"] == len(delta_groups(small, OPTIONS, budget)) + sum(map(len, pieces))
    np.testing.assert_allclose(_matrix(split), _matrix(one), rtol=1e-6, atol=0)
    np.testing.assert_allclose(_matrix(split, "cost_std"), _matrix(one, "cost_std"), rtol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, "big", True, float("nan")])
def test_bad_budget_is_refused(bad) -> None:
    with pytest.raises(InvalidParameterError, match="delta_budget_mb"):
        get_estimator("gauss-newton", delta_budget_mb=bad)


@pytest.mark.parametrize("method", ["gauss-newton", "fisher"])
def test_no_pass_holds_more_deltas_than_the_budget(llama, method, monkeypatch) -> None:
    """Every delta tensor alive in a pass — a group's, or a unit's row piece — fits the budget,
    and the units over it are the only ones split (a single row is never over it here)."""
    import sensitivity._curvature.passes as passes
    import sensitivity._fisher as fisher

    model, batches, units = llama
    sizes = [delta_bytes(u, OPTIONS) for u in units]
    budget = max(sizes) // 2 + 1
    held: list[int] = []

    def groups_of(real):
        def wrapped(*args, **kwargs):
            deltas = real(*args, **kwargs)
            held.append(sum(d.numel() * d.element_size() for d in deltas))
            return deltas
        return wrapped

    def piece_of(real):
        def wrapped(*args, **kwargs):
            delta = real(*args, **kwargs)
            held.append(delta.numel() * delta.element_size())
            return delta
        return wrapped

    monkeypatch.setattr(passes, "quant_deltas", groups_of(passes.quant_deltas))
    monkeypatch.setattr(fisher, "quant_deltas", groups_of(fisher.quant_deltas))
    monkeypatch.setattr(passes, "weight_deltas", piece_of(passes.weight_deltas))
    table = get_estimator(method, probes=1, delta_budget_mb=budget / 2**20, by_blocks=False).estimate(
        model, _ctx(model, batches, units))
    assert len(held) >= 3 and table.metadata["passes"] >= 3
    assert max(held) <= budget < sum(sizes)


def test_default_budget_leaves_room_in_a_gigabyte() -> None:
    """The default holds half of the 1 GB a run may add to the model (docs/memory.md)."""
    from sensitivity._deltas import DEFAULT_DELTA_BUDGET_MB

    assert get_estimator("gauss-newton").delta_budget_mb == DEFAULT_DELTA_BUDGET_MB == 256
    assert get_estimator("fisher").delta_budget_mb == DEFAULT_DELTA_BUDGET_MB
