"""Storage accounting of every option family, GGUF block sizes included."""

from __future__ import annotations

import pytest

from allocator import CostTable
from allocator.core.errors import InvalidParameterError, UnknownNameError
from allocator.core.formats import DEFAULT_OPTIONS, GGUF_TYPES, FormatKind, parse_format, parse_options


@pytest.mark.parametrize("label,bpw", [
    ("int4-g128-asym", 4 + 32 / 128), ("int4-g128-sym", 4 + 16 / 128),
    ("int3-g64-asym", 3 + 32 / 64), ("int2-g32-sym", 2 + 16 / 32),
    ("int4-g128-asym-gptq", 4 + 20 / 128), ("int2-g128-sym-gptq", 2 + 18 / 128),
    ("fp16", 16.0), ("bf16", 16.0),
])
def test_integer_and_float_bits_per_weight(label: str, bpw: float) -> None:
    assert parse_format(label).bits_per_weight() == pytest.approx(bpw, rel=1e-15)


def test_per_channel_overhead_needs_in_features() -> None:
    assert parse_format("int8-ch-sym").bits_per_weight(4096) == 8 + 16 / 4096
    assert parse_format("int8-ch-asym").bits_per_weight(4096) == 8 + 32 / 4096
    with pytest.raises(InvalidParameterError, match="in_features"):
        parse_format("int8-ch-sym").bits_per_weight()


#: bits per weight = block bytes · 8 / block weights (ggml-common.h)
GGUF_BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_K": 2.625,
            "q3_K": 3.4375, "q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625, "iq4_nl": 4.5,
            "iq4_xs": 4.25, "mxfp4": 4.25, "iq3_s": 3.4375, "iq3_xxs": 3.0625, "iq2_s": 2.5625,
            "iq2_xs": 2.3125, "iq2_xxs": 2.0625, "iq1_m": 1.75, "iq1_s": 1.5625,
            "tq1_0": 1.6875, "tq2_0": 2.0625, "f16": 16.0, "bf16": 16.0}


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_gguf_table(name: str) -> None:
    fmt = parse_format(name)
    assert fmt.bits_per_weight() == GGUF_BPW[name]
    if name != "bf16":  # "bf16" parses as the float format, not the GGUF type
        assert fmt.kind is FormatKind.GGUF


def test_gguf_quantized_flags_and_emulation() -> None:
    assert parse_format("q4_K").is_quantized and parse_format("q4_K").emulation == (4, 32, False)
    assert not parse_format("f16").is_quantized
    assert parse_format("iq2_xs").emulation is None
    assert parse_format("int3-g64-sym").emulation == (3, 64, True)


def test_table_sizes_come_from_the_catalogue() -> None:
    t = CostTable.from_unit_costs(units=["a", "b"], params=[256, 512], in_features=[64, 128],
                                  options=["int4-g128-asym", "q6_K", "int8-ch-sym"],
                                  cost=[[1, 0.5, 0], [1, 0.5, 0]])
    sizes = dict(zip(zip(t.df["unit"], t.df["option"], strict=True), t.df["size_bits"],
                     strict=True))
    assert sizes[("a", "int4-g128-asym")] == 256 * 4.25
    assert sizes[("b", "q6_K")] == 512 * 6.5625
    assert sizes[("a", "int8-ch-sym")] == 256 * (8 + 16 / 64)
    assert sizes[("b", "int8-ch-sym")] == 512 * (8 + 16 / 128)


@pytest.mark.parametrize("label", ["int9-g128-sym", "int4-g128", "q4_k", "int4-g0-sym", ""])
def test_unknown_labels_name_the_grammar(label: str) -> None:
    with pytest.raises(UnknownNameError, match=repr(label)):
        parse_format(label)


def test_option_specs() -> None:
    assert tuple(f.name for f in parse_options(None)) == DEFAULT_OPTIONS
    assert [f.name for f in parse_options("int2..4-g64-sym, fp16")] == [
        "int2-g64-sym", "int3-g64-sym", "int4-g64-sym", "fp16"]
    with pytest.raises(InvalidParameterError, match="twice"):
        parse_options("q4_K,q4_K")


def test_dense_palette_is_named_sorted_by_size_and_denser_than_the_default() -> None:
    from allocator.core.formats import DENSE_OPTIONS

    dense = parse_options("dense")
    assert [f.name for f in dense] == list(DENSE_OPTIONS)
    assert parse_options(" dense ") == dense
    bits = sorted(f.bits_per_weight(128) for f in dense if f.name != "fp16")
    default = sorted(f.bits_per_weight(128) for f in parse_options(None) if f.name != "fp16")
    # a step between every pair of neighbouring int-g128-asym widths up to int4
    for lo, hi in zip(default[:3], default[1:4], strict=True):
        assert any(lo < b < hi for b in bits), (lo, hi)
