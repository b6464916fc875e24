"""GgmlQuantizer (``ggml``): llama.cpp's exact quantizer for GGUF options, RTN for the others,
an imatrix from calibration data, cached per (unit, option) (docs/quantizer.md)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format  # noqa: E402
from allocator.core.units import Unit, UnitKind  # noqa: E402
from allocator.model.quant import (  # noqa: E402
    QUANTIZERS,
    GgmlQuantizer,
    build_quantizer,
    default_quantizer,
    fake_quantize,
    quantize_ggml,
)

W = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
IMP = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 2


def _unit(name: str = "m", columns: tuple[int, int] | None = None, width: int = 512) -> Unit:
    return Unit(name=name if columns is None else f"{name}[g=0]", module=name, kind=UnitKind.LINEAR,
                shape=(8, width), params=8 * width, in_features=512, columns=columns)


@pytest.mark.parametrize("name", ["q4_K", "q6_K", "q4_0", "q5_1", "iq4_nl", "q8_0"])
def test_gguf_options_are_ggmls_values(name: str) -> None:
    fmt = parse_format(name)
    plain = GgmlQuantizer().quantize(_unit(), W, fmt)
    assert torch.equal(plain, quantize_ggml(W, name).values)
    weighted = GgmlQuantizer({"m": IMP}).quantize(_unit(), W, fmt)
    assert torch.equal(weighted, quantize_ggml(W, name, importance=IMP).values)
    if name != "q8_0":  # q8_0 ignores importance, as ggml does
        assert not torch.equal(plain, weighted)


def test_other_options_fall_back_to_rtn_and_dtype_is_kept() -> None:
    q = GgmlQuantizer({"m": IMP})
    fmt = parse_format("int4-g128-asym")
    assert torch.equal(q.quantize(_unit(), W, fmt), fake_quantize(W, fmt))
    narrow = W[:, :96]  # a K type's 256-weight block does not divide 96: llama.cpp falls back too
    got = q.quantize(_unit("n", width=96), narrow, parse_format("q4_K"))
    assert torch.equal(got, fake_quantize(narrow, parse_format("q4_K")))
    half = q.quantize(_unit("h"), W.to(torch.bfloat16), parse_format("q4_0"))
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, quantize_ggml(W.to(torch.bfloat16), "q4_0").values.to(torch.bfloat16))


def test_group_units_take_their_column_slice_of_the_importance() -> None:
    q = GgmlQuantizer({"m": IMP})
    got = q.quantize(_unit(columns=(256, 512)), W[:, 256:], parse_format("q4_K"))
    assert torch.equal(got, quantize_ggml(W[:, 256:], "q4_K", importance=IMP[256:]).values)
    with pytest.raises(InvalidParameterError, match="importance"):
        GgmlQuantizer({"m": IMP[:100]}).quantize(_unit(), W, parse_format("q4_0"))


def test_results_are_cached_per_unit_and_option() -> None:
    q = GgmlQuantizer()
    a = q.quantize(_unit(), W, parse_format("q4_K"))
    b = q.quantize(_unit(), W, parse_format("q4_K"))
    assert a is b and q.computed == 1 and q.hits == 1
    q.quantize(_unit(), W, parse_format("q5_K"))
    assert q.computed == 2
    tiny = GgmlQuantizer(cache_bytes=W.numel() * 4)  # room for one result
    tiny.quantize(_unit(), W, parse_format("q4_K"))
    tiny.quantize(_unit(), W, parse_format("q5_K"))
    tiny.quantize(_unit(), W, parse_format("q4_K"))
    assert tiny.computed == 3
    with pytest.raises(InvalidParameterError, match="cache_bytes"):
        GgmlQuantizer(cache_bytes=-1)


def test_the_name_is_registered_and_llamacpp_defaults_to_it() -> None:
    assert "ggml" in QUANTIZERS
    assert default_quantizer("llamacpp") == "ggml"
    assert default_quantizer(None) == default_quantizer("llmcompressor") == "rtn"
    q = build_quantizer("ggml")
    assert isinstance(q, GgmlQuantizer) and q.name == "ggml" and q.importance is None


def test_importance_is_the_mean_squared_input_without_padding(tiny, tiny_calib) -> None:
    from allocator.model.quant import collect_importance
    from allocator.model.quant.ggml_quantizer import ggml_quantizer

    model = tiny.model
    name = "model.layers.0.mlp.down_proj"
    rows: list[torch.Tensor] = []
    current: dict[str, torch.Tensor] = {}
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, inp: rows.append(inp[0][current["mask"].bool()].double()))
    try:
        with torch.no_grad():
            for b in tiny_calib:
                current["mask"] = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        hook.remove()
    x = torch.cat(rows)
    expected = (x * x).mean(0).float()
    got = collect_importance(model, [name], tiny_calib,
                             lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
    assert torch.allclose(got[name], expected, rtol=1e-6)
    from allocator.core.units import discover_units

    units = [u for u in discover_units(model) if u.module == name]
    q = ggml_quantizer(model, units, tiny_calib, kind="causal_lm")
    assert q.importance is not None and torch.allclose(q.importance[name], expected, rtol=1e-6)
    assert ggml_quantizer(model, units, tiny_calib, kind="causal_lm", importance=False).importance is None
