"""The one RTN quantizer shared by the estimators and the quantization backend (torch, lazy)."""

from __future__ import annotations

from allocator.model.quant.rtn import (
    fake_quantize,
    fake_quantize_int,
    quant_error,
    quantize_groups,
    rtn_grid,
)

__all__ = ["fake_quantize", "fake_quantize_int", "quant_error", "quantize_groups", "rtn_grid"]
