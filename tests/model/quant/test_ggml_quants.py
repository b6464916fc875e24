"""llama.cpp's quantizers in torch: GGUF bytes that gguf-py reads back to our values exactly,
bit-equal to gguf-py's own quantizers and (when it builds here) to ggml's C code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _ggml_cases import weights_and_importance

from allocator.core.errors import InvalidParameterError, UnknownNameError
from allocator.core.formats import GGUF_TYPES
from allocator.model.quant import GGML_BLOCKS, dequantize_ggml, quantize_ggml

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

TYPES = list(GGML_BLOCKS)
W, IMP = weights_and_importance(512, seed=0)


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name.upper()]


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_gguf_py_reads_our_bytes_to_our_values(name: str, with_importance: bool) -> None:
    q = quantize_ggml(W, name, importance=IMP if with_importance else None)
    assert q.data.dtype == np.uint8
    assert q.data.shape == (W.shape[0], W.shape[1] // GGML_BLOCKS[name].block * GGML_BLOCKS[name].block_bytes)
    back = gguf_dequantize(q.data, _qtype(name))
    mismatches = int((back != q.values.numpy()).sum())
    assert mismatches == 0
    assert torch.equal(dequantize_ggml(q.data, name, tuple(W.shape)), q.values)
    finite_rows = W.abs().amax(1) < 1e3  # the 3e3-scaled row is fine but dominates the error
    rel = ((q.values - W)[finite_rows].pow(2).sum() / W[finite_rows].pow(2).sum()).item()
    assert rel < {"q2_K": 0.3, "q3_K": 0.1}.get(name, 0.05)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_bytes_equal_gguf_py_reference_quantizer(name: str) -> None:
    ours = quantize_ggml(W, name).data
    theirs = gguf_quantize(W.numpy(), _qtype(name))
    # Row 1 holds only ±0: ggml (and we, checked against its C code) keep C's sign of the zero
    # scale or min, gguf-py's numpy port writes +0. Every other row is byte-identical.
    signed_zeros = 1
    others = np.arange(W.shape[0]) != signed_zeros
    assert np.array_equal(ours[others], theirs[others])
    assert np.array_equal(gguf_dequantize(ours, _qtype(name)), gguf_dequantize(theirs, _qtype(name)))
    # q8_0 ignores importance in ggml; the others switch to the weighted search
    weighted = quantize_ggml(W, name, importance=IMP).data
    assert np.array_equal(weighted[others], theirs[others]) == (name == "q8_0")


@pytest.mark.parametrize("name", TYPES)
def test_bits_per_weight_match_the_format_table(name: str) -> None:
    spec = GGML_BLOCKS[name]
    assert spec.bits_per_weight == pytest.approx(GGUF_TYPES[name].bpw)
    q = quantize_ggml(W[:2], name)
    assert q.data.size * 8 / W[:2].numel() == spec.bits_per_weight == q.bits_per_weight


@pytest.mark.parametrize("name", ["q4_0", "q4_K", "q3_K", "iq4_nl"])
def test_importance_lowers_the_weighted_error(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    imp = torch.ones(256)
    imp[::8] = 50.0  # a few columns matter much more
    plain = quantize_ggml(w, name).values
    weighted = quantize_ggml(w, name, importance=imp).values
    err = lambda v: float(((v - w) ** 2 * imp).sum())  # noqa: E731
    assert err(weighted) < err(plain)


def test_shapes_dtypes_and_case_are_accepted() -> None:
    w3 = W[:4].reshape(2, 2, 512).to(torch.bfloat16)
    q = quantize_ggml(w3, "Q4_K")
    assert q.ggml_type == "q4_K" and q.values.shape == (2, 2, 512) and q.data.shape == (2, 2, 288)
    assert torch.equal(q.values.reshape(4, 512), quantize_ggml(w3.float().reshape(4, 512), "q4_K").values)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(UnknownNameError, match="iq2_xs"):
        quantize_ggml(W, "iq2_xs")
    with pytest.raises(InvalidParameterError, match="multiple of 256"):
        quantize_ggml(torch.randn(2, 576), "q4_K")
    with pytest.raises(InvalidParameterError, match="one per input column"):
        quantize_ggml(W, "q4_0", importance=torch.ones(7))
    with pytest.raises(InvalidParameterError, match="non-finite"):
        quantize_ggml(torch.full((1, 32), float("nan")), "q8_0")
    with pytest.raises(InvalidParameterError, match="bytes"):
        dequantize_ggml(np.zeros(17, np.uint8), "q4_0", (1, 32))
