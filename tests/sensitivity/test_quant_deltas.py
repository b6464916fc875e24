"""Quantization deltas in bounded memory (sensitivity/_deltas.py, RTN codes):

* the codes rebuild ``fake_quantize(W) − W`` bit for bit (int, k-quant emulations, fp16/bf16,
  column-group units, short last groups);
* they take ≈ 1 byte per weight and option, a quarter of the float32 deltas;
* the gauss-newton and fisher tables do not depend on how the units are split into passes, and
  equal the float32-delta reference they replace.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format, parse_options  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._deltas import QuantDeltas, delta_bytes, delta_groups  # noqa: E402
from sensitivity._gauss_newton import (  # noqa: E402
    gn_diagonal_terms,
    gn_quadratic_terms,
    quant_deltas,
    sampled_curvature,
    unit_reduction,
)
from sensitivity._loss import unit_leaves  # noqa: E402

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


def test_codes_rebuild_the_deltas_bit_for_bit(llama) -> None:
    model, _, units = llama
    deltas = QuantDeltas.build(model, units, OPTIONS)
    for i, unit in enumerate(units):
        w = unit_weight(model, unit).detach().float()
        for o, fmt in enumerate(OPTIONS):
            ref = (fake_quantize(w, fmt) - w).reshape(w.shape[0], -1)
            assert torch.equal(deltas.delta(i, o), ref), (unit.name, fmt.name)


def test_codes_take_a_quarter_of_the_float_deltas(llama) -> None:
    model, _, units = llama
    ints = [f for f in OPTIONS if f.name not in ("fp16", "bf16")]
    assert QuantDeltas.build(model, units, ints).nbytes == sum(delta_bytes(u, ints) for u in units)
    layer = torch.nn.Sequential(torch.nn.Linear(512, 256))
    (unit,) = discover_units(layer)
    g128 = parse_options("int2..4-g128-asym")
    deltas = QuantDeltas.build(layer, [unit], g128)
    float32 = 4 * unit.params * len(g128)
    assert deltas.nbytes == delta_bytes(unit, g128) <= 0.27 * float32  # 1 + 8/128 bytes vs 4


def test_groups_respect_the_budget(llama) -> None:
    _, _, units = llama
    sizes = [delta_bytes(u, OPTIONS) for u in units]
    budget = max(sizes) + min(sizes)
    groups = delta_groups(units, OPTIONS, budget)
    assert [i for g in groups for i in g] == list(range(len(units)))
    assert all(sum(sizes[i] for i in g) <= budget for g in groups)
    assert 1 < len(groups) < len(units)
    assert delta_groups(units, OPTIONS, 1) == [[i] for i in range(len(units))]


@pytest.mark.parametrize("method", ["gauss-newton", "fisher"])
def test_tables_do_not_depend_on_the_passes(llama, method) -> None:
    model, batches, units = llama
    ctx = _ctx(model, batches, units)
    one = get_estimator(method, probes=1).estimate(model, ctx)
    many = get_estimator(method, probes=1, delta_budget_mb=1e-6).estimate(model, ctx)
    assert one.metadata["passes"] == 1 and many.metadata["passes"] == len(units)
    np.testing.assert_allclose(_matrix(many), _matrix(one), rtol=1e-6, atol=0)
    np.testing.assert_allclose(_matrix(many, "cost_std"), _matrix(one, "cost_std"), rtol=1e-5)


@pytest.mark.parametrize("method", ["gauss-newton", "fisher"])
def test_tables_equal_the_float32_delta_reference(llama, method) -> None:
    model, batches, units = llama
    options = OPTIONS[:5]  # the reference stacks every option's float32 delta
    ctx = _ctx(model, batches, units, options)
    _, index = unit_leaves(model, units)
    ref_deltas = quant_deltas(model, ctx)
    if method == "gauss-newton":
        term = lambda g, i: gn_quadratic_terms(g, ref_deltas[i])  # noqa: E731
    else:
        term = lambda g, i: gn_diagonal_terms(g, ref_deltas[i] ** 2)  # noqa: E731
    ref = sampled_curvature(model, ctx, unit_reduction(units, index, term), probes=1)
    new = get_estimator(method, probes=1).estimate(model, ctx)
    np.testing.assert_allclose(_matrix(new), ref.mean, rtol=1e-5)
    np.testing.assert_allclose(_matrix(new, "cost_std"), ref.sem, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, -1, "big", True, float("nan")])
def test_bad_budget_is_refused(bad) -> None:
    with pytest.raises(InvalidParameterError, match="delta_budget_mb"):
        get_estimator("gauss-newton", delta_budget_mb=bad)
