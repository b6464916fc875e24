"""The one RTN quantizer shared by the estimators and the quantization backend (torch, lazy), and
llama.cpp's own quantizers (:mod:`allocator.model.quant.ggml`, GGUF block bytes)."""

from __future__ import annotations

from allocator.model.quant.ggml import GGML_BLOCKS, GgmlQuantized, dequantize_ggml, quantize_ggml
from allocator.model.quant.rtn import (
    fake_quantize,
    fake_quantize_int,
    quant_error,
    quantize_groups,
    rtn_grid,
)

__all__ = [
    "GGML_BLOCKS",
    "GgmlQuantized",
    "dequantize_ggml",
    "fake_quantize",
    "fake_quantize_int",
    "quant_error",
    "quantize_ggml",
    "quantize_groups",
    "rtn_grid",
]
