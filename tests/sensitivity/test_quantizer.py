"""The plan's quantizer (allocator.model.quant.quantizer) and the estimators that form ΔW with it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format, parse_options  # noqa: E402
from allocator.core.units import Unit, UnitKind, discover_units, unit_weight  # noqa: E402
from allocator.model.quant import (  # noqa: E402
    GptqQuantizer,
    HessianAccumulator,
    RtnQuantizer,
    column_formats,
    fake_quantize,
    gptq_quantize,
    gptq_quantizer,
)
from sensitivity import EstimateContext, get_estimator  # noqa: E402

OPTIONS = parse_options("int2..4-g8-asym")


def _linear_unit(name: str, w: torch.Tensor, columns: tuple[int, int] | None = None) -> Unit:
    cols = w.shape[1] if columns is None else columns[1] - columns[0]
    return Unit(name=name if columns is None else f"{name}[g=0]", module=name, kind=UnitKind.LINEAR,
                shape=(w.shape[0], cols), params=w.shape[0] * cols, in_features=cols, columns=columns)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 XᵀX / n of token rows x [n, cols], float64 (by hand)."""
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


def test_gptq_quantizer_is_gptq_quantize_with_the_same_hessian_and_caches() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    x = torch.randn(40, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs
    acc = HessianAccumulator(16)
    for part in x.split(15):
        acc.add_batch(part)
    torch.testing.assert_close(acc.H, _hessian(x))
    q = GptqQuantizer({"fc": acc.H})
    unit = _linear_unit("fc", w)
    fmt = parse_format("int3-g8-asym")
    got = q.quantize(unit, w, fmt)
    want, _ = gptq_quantize(w, acc.H, column_formats(16, [(0, 16, fmt)]))
    assert torch.equal(got, want)
    assert not torch.equal(got, fake_quantize(w, fmt))  # GPTQ, not RTN
    assert q.quantize(unit, w, fmt) is got and (q.computed, q.hits) == (1, 1)
    # GPTQ minimises the output error ‖ΔW X‖, RTN the weight error
    out_err = {k: float(((v - w) @ x.T).norm()) for k, v in (("gptq", got), ("rtn", fake_quantize(w, fmt)))}
    assert out_err["gptq"] < out_err["rtn"]


def test_column_group_unit_is_gptq_of_its_slice_with_the_hessian_block() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 16, generator=g)
    H = _hessian(torch.randn(30, 16, generator=g))
    fmt = parse_format("int2-g8-asym")
    unit = _linear_unit("fc", w, columns=(8, 16))
    got = GptqQuantizer({"fc": H}).quantize(unit, w[:, 8:], fmt)
    want, _ = gptq_quantize(w[:, 8:], H[8:, 8:], column_formats(8, [(0, 8, fmt)]))
    assert torch.equal(got, want)


def test_cache_budget_drops_the_least_recently_used() -> None:
    w = torch.randn(4, 8)
    q = GptqQuantizer({"fc": _hessian(torch.randn(20, 8))}, cache_bytes=w.numel() * 4)
    unit, (a, b) = _linear_unit("fc", w), parse_options("int2-g8-asym,int3-g8-asym")
    q.quantize(unit, w, a)
    q.quantize(unit, w, b)  # evicts a
    q.quantize(unit, w, a)
    assert q.computed == 3 and q.runs[("fc", "int2-g8-asym")] == 2
    with pytest.raises(InvalidParameterError, match="cache_bytes"):
        GptqQuantizer({}, cache_bytes=-1)
    with pytest.raises(InvalidParameterError, match="no input Hessian"):
        GptqQuantizer({}).quantize(unit, w, a)


def _hand_hessians(model: torch.nn.Module, modules: list[str], batches) -> dict[str, torch.Tensor]:
    """H = 2XXᵀ/n of every module's real (unpadded) input tokens, from captured inputs."""
    xs: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    current = {}
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda _mod, inp, m=m: xs[m].append(inp[0][current["mask"].bool()].detach()))
        for m in modules]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {m: _hessian(torch.cat(v)) for m, v in xs.items()}


class _Given:
    """A quantizer that hands out precomputed Q per (unit, option)."""

    name = "given"

    def __init__(self, q: dict[tuple[str, str], torch.Tensor]) -> None:
        self.q = q

    def quantize(self, unit: Unit, weight: torch.Tensor, fmt) -> torch.Tensor:
        return self.q[(unit.name, fmt.name)]


def test_gauss_newton_with_gptq_equals_the_table_from_gptq_deltas_by_hand() -> None:
    model, batches = tiny_llama(), llama_batches()
    units = discover_units(model, group_columns=8, include=r"v_proj|down_proj|lm_head")
    assert any(u.columns is not None for u in units)
    quantizer = gptq_quantizer(model, units, batches, kind="causal_lm")
    hand = _hand_hessians(model, sorted({u.module for u in units}), batches)
    for m, H in hand.items():
        torch.testing.assert_close(quantizer.hessians[m], H, rtol=1e-9, atol=1e-12)
    given = {}
    for u in units:
        w = unit_weight(model, u).detach().float()
        H = hand[u.module]
        if u.columns is not None:
            H = H[u.columns[0]:u.columns[1], u.columns[0]:u.columns[1]]
        for f in OPTIONS:
            given[(u.name, f.name)] = gptq_quantize(w, H, column_formats(w.shape[1], [(0, w.shape[1], f)]))[0]

    def table(q):
        ctx = EstimateContext(batches=batches, units=units, options=OPTIONS, model_kind="causal_lm",
                              progress=False, quantizer=q)
        return get_estimator("gauss-newton", probes=16).estimate(model, ctx)

    got, want, rtn = table(quantizer), table(_Given(given)), table(RtnQuantizer())
    np.testing.assert_allclose(got.df["cost"], want.df["cost"], rtol=1e-6, atol=1e-12)
    assert not np.allclose(got.df["cost"], rtn.df["cost"])
    assert quantizer.computed == len(units) * len(OPTIONS)  # each (unit, option) once


def test_default_context_uses_rtn_and_tables_record_the_quantizer(tiny) -> None:
    from dataclasses import replace

    from sensitivity import EstimateSpec, estimate

    assert isinstance(EstimateContext(batches=[], units=[], options=OPTIONS).quantizer, RtnQuantizer)
    spec = EstimateSpec(method="datafree", options="int2..4-g32-asym", samples=4, seq_len=32, batch_size=4,
                        include="model.layers.0.mlp.*", progress=False, params={"score": "mse"})
    rtn = estimate(tiny, spec)
    gptq = estimate(tiny, replace(spec, quantizer="gptq"))  # data-free, but GPTQ loads calibration data
    assert rtn.metadata["quantizer"] == "rtn" and gptq.metadata["quantizer"] == "gptq"
    # GPTQ trades weight error for output error: its relative weight MSE is larger
    assert (gptq.df["cost"].to_numpy() >= rtn.df["cost"].to_numpy() - 1e-12).all()
    with pytest.raises(InvalidParameterError, match="quantizer 'awq' is unknown"):
        EstimateSpec(method="salience", quantizer="awq")
