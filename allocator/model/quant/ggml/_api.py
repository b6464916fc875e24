"""``quantize`` / ``dequantize``: the public entry points (checks, dispatch, GGUF byte shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError
from allocator.model.quant.ggml._iq4nl import dequantize_iq4_nl, quantize_iq4_nl
from allocator.model.quant.ggml._k_high import (
    dequantize_q6_K,
    dequantize_q45_K,
    quantize_q6_K,
    quantize_q45_K,
)
from allocator.model.quant.ggml._k_low import dequantize_q2_K, dequantize_q3_K, quantize_q2_K, quantize_q3_K
from allocator.model.quant.ggml._legacy import dequantize_legacy, quantize_legacy
from allocator.model.quant.ggml._ops import seq_sum, sqrtf
from allocator.model.quant.ggml._types import GgmlBlock, block_of

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["GgmlQuantized", "dequantize", "quantize"]

_LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


@dataclass(frozen=True, kw_only=True)
class GgmlQuantized:
    """A tensor quantized by ggml's algorithm: its GGUF bytes and what they dequantize to."""

    ggml_type: str
    #: float32 tensor of the weight's shape: ggml's ``dequantize_row_<type>`` of ``data``.
    values: torch.Tensor
    #: uint8 array, shape ``(*shape[:-1], shape[-1] / block · block_bytes)`` (gguf-py's byte shape).
    data: np.ndarray

    @property
    def bits_per_weight(self) -> float:
        return block_of(self.ggml_type).bits_per_weight


def _check_weight(weight: torch.Tensor, spec: GgmlBlock) -> torch.Tensor:
    import torch

    if not isinstance(weight, torch.Tensor) or weight.ndim < 1 or weight.numel() == 0:
        raise InvalidParameterError(
            f"weight must be a non-empty torch.Tensor [rows, cols], got {type(weight).__name__}"
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else ''}"
        )
    cols = weight.shape[-1]
    if cols % spec.block:
        raise InvalidParameterError(
            f"{spec.name} needs rows whose length is a multiple of {spec.block}, got {cols}; "
            f"use a {'32-weight type such as iq4_nl or q8_0' if spec.block == 256 else 'padded row'}"
        )
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise InvalidParameterError(
            f"weight has non-finite values; ggml quantizes finite weights only ({spec.name})"
        )
    return x.reshape(-1, cols)


def _check_importance(importance: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    import torch

    if importance is None:
        return None
    qw = torch.as_tensor(importance).detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    if qw.numel() != cols:
        raise InvalidParameterError(
            f"importance has {qw.numel()} values; pass one per input column ({cols}), as an imatrix entry"
        )
    if not bool(torch.isfinite(qw).all()):
        raise InvalidParameterError("importance has non-finite values; pass finite per-column weights")
    return qw


def _quantize_rows(x: torch.Tensor, name: str, qw: torch.Tensor | None) -> torch.Tensor:
    """Rows [R, C] → block bytes [R · C / block, block_bytes]."""
    rows, cols = x.shape
    block = block_of(name).block
    blocks = x.reshape(-1, block)
    qw_b = None if qw is None else qw.reshape(1, cols).expand(rows, cols).reshape(-1, block)
    if name in _LEGACY:
        if qw_b is not None and name != "q8_0":
            sigma2 = (seq_sum(x * x) / float(cols)).repeat_interleave(cols // block).unsqueeze(-1)
            qw_b = qw_b * sqrtf(sigma2 + blocks * blocks)
        return quantize_legacy(blocks, name, qw_b)
    if name == "iq4_nl":
        return quantize_iq4_nl(blocks, qw_b)
    if name == "q2_K":
        return quantize_q2_K(blocks, qw_b)
    if name == "q3_K":
        return quantize_q3_K(blocks, qw_b)
    if name == "q6_K":
        return quantize_q6_K(blocks, qw_b)
    return quantize_q45_K(blocks, qw_b, is_q5=name == "q5_K")


def _dequantize_blocks(data: torch.Tensor, name: str) -> torch.Tensor:
    if name in _LEGACY:
        return dequantize_legacy(data, name)
    if name == "iq4_nl":
        return dequantize_iq4_nl(data)
    if name == "q2_K":
        return dequantize_q2_K(data)
    if name == "q3_K":
        return dequantize_q3_K(data)
    if name == "q6_K":
        return dequantize_q6_K(data)
    return dequantize_q45_K(data, is_q5=name == "q5_K")


def quantize(
    weight: torch.Tensor, ggml_type: str, *, importance: torch.Tensor | None = None
) -> GgmlQuantized:
    """Quantize ``weight`` (rows along the last axis) exactly as ggml's ``quantize_<type>``.

    ``importance`` is an imatrix entry: one non-negative weight per input column (the last
    axis). With it ggml runs its ``quantize_row_<type>_impl`` search, without it the ``_ref``
    quantizer (q8_0 ignores it; iq4_nl always searches, weighting by x² without it).
    """
    spec = block_of(ggml_type)
    x = _check_weight(weight, spec)
    qw = _check_importance(importance, x.shape[1])
    blocks = _quantize_rows(x, spec.name, qw)
    values = _dequantize_blocks(blocks, spec.name).reshape(weight.shape)
    byte_shape = (*weight.shape[:-1], weight.shape[-1] // spec.block * spec.block_bytes)
    return GgmlQuantized(ggml_type=spec.name, values=values, data=blocks.reshape(byte_shape).numpy())


def dequantize(data: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """GGUF bytes of ``ggml_type`` → float32 weights of ``shape`` (ggml's ``dequantize_row_*``)."""
    import numpy as np
    import torch

    spec = block_of(ggml_type)
    n = int(np.prod(shape))
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if n % spec.block or raw.size != n // spec.block * spec.block_bytes:
        raise InvalidParameterError(
            f"{raw.size} bytes do not hold a {spec.name} tensor of shape {tuple(shape)} "
            f"({n // spec.block * spec.block_bytes} bytes); pass the matching shape"
        )
    blocks = torch.from_numpy(raw.copy()).reshape(-1, spec.block_bytes)
    return _dequantize_blocks(blocks, spec.name).reshape(shape)
