"""The 32-weight block types q4_0, q4_1, q5_0, q5_1, q8_0 (ggml-quants.c), bytes in and out.

Without importance weights these are ggml's ``quantize_row_*_ref``: a scale from the block's
extreme values and one rounding (``(int8_t)(x·id + 8.5f)`` truncates, q8_0 uses ``roundf``).
With them, ``quantize_row_*_impl``: weights w = qw·√(σ² + x²) (σ² = the row's mean square) and
ggml's scale search (``make_qx_quants`` for the symmetric types, ``make_qkx3_quants`` for the
ones with a min). q8_0 ignores importance, as ggml does. Blocks come element-major ``[32, N]``.
"""

from __future__ import annotations

import numpy as np

from allocator.model.quant.ggml._layout import (
    bits_to_bytes,
    fp16_bytes,
    half_at,
    pack_nibbles,
    unpack_bits,
    unpack_nibbles,
)
from allocator.model.quant.ggml._ops import first_absmax, first_max, first_min, fp16_round, roundf
from allocator.model.quant.ggml._search import make_qkx_quants, make_qx_quants

__all__ = ["dequantize_legacy", "quantize_legacy"]


def _inv(d: np.ndarray) -> np.ndarray:
    """``id = d ? 1.0f/d : 0.0f``."""
    nz = d != 0
    return np.where(nz, np.float32(1.0) / np.where(nz, d, np.float32(1.0)), np.float32(0.0))


def _trunc_codes(v: np.ndarray) -> np.ndarray:
    """C's float → integer conversion (truncation toward zero)."""
    return np.trunc(v).astype(np.int32)


def _ref_codes(blocks: np.ndarray, ggml_type: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``quantize_row_<type>_ref``: (d, min or None, levels [32, N]) per block."""
    if ggml_type in ("q4_0", "q5_0"):
        half = 8 if ggml_type == "q4_0" else 16
        _, mx = first_absmax(blocks)
        d = mx / np.float32(-half)
        codes = _trunc_codes(blocks * _inv(d) + np.float32(half + 0.5))
        return d, None, np.minimum(codes, 2 * half - 1)
    if ggml_type in ("q4_1", "q5_1"):
        nmax = 15 if ggml_type == "q4_1" else 31
        lo, hi = first_min(blocks), first_max(blocks)
        d = (hi - lo) / np.float32(nmax)
        codes = _trunc_codes((blocks - lo) * _inv(d) + np.float32(0.5))
        return d, lo, np.minimum(codes, 15) if nmax == 15 else codes & 0xFF
    amax = np.abs(blocks).max(axis=0)  # q8_0
    d = amax / np.float32(127.0)
    return d, None, roundf(blocks * _inv(d)).astype(np.int32)


def _impl_codes(
    blocks: np.ndarray, ggml_type: str, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``quantize_row_<type>_impl`` with importance: (d, min or None, levels) per block."""
    if ggml_type in ("q4_0", "q5_0"):
        d, levels = make_qx_quants(blocks, 8 if ggml_type == "q4_0" else 16, weights)
        return d, None, levels
    nmax = 15 if ggml_type == "q4_1" else 31
    d, the_min, levels = make_qkx_quants(
        blocks, weights, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
    )
    return d, -the_min, levels


def quantize_legacy(blocks: np.ndarray, ggml_type: str, weights: np.ndarray | None) -> np.ndarray:
    """Blocks [32, N] (and the _impl weights w, or None for _ref) → GGUF block bytes [N, size]."""
    if weights is None or ggml_type == "q8_0":
        d, vmin, levels_em = _ref_codes(blocks, ggml_type)
    else:
        d, vmin, levels_em = _impl_codes(blocks, ggml_type, weights)
    levels = levels_em.T
    parts = [fp16_bytes(fp16_round(d))]
    if vmin is not None:
        parts.append(fp16_bytes(fp16_round(vmin)))
    if ggml_type == "q8_0":
        parts.append((levels & 0xFF).astype(np.uint8))
    elif ggml_type in ("q4_0", "q4_1"):
        parts.append(pack_nibbles(levels[:, :16] & 0xF, levels[:, 16:] & 0xF))
    else:  # 16 qs bytes (element j low, j + 16 high) after the 4 qh bytes (bit 4)
        parts += [bits_to_bytes((levels >> 4) & 1), pack_nibbles(levels[:, :16] & 0xF, levels[:, 16:] & 0xF)]
    return np.concatenate(parts, axis=1)


def dequantize_legacy(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """``dequantize_row_<type>``: block bytes [N, size] → float32 weights [N, 32]."""
    d = half_at(data, 0)[:, None]
    if ggml_type == "q8_0":
        return np.ascontiguousarray(data[:, 2:]).view(np.int8).astype(np.float32) * d
    has_min = ggml_type in ("q4_1", "q5_1")
    start = 4 if has_min else 2
    if ggml_type in ("q5_0", "q5_1"):
        high = unpack_bits(data[:, start : start + 4]) << 4
        start += 4
    else:
        high = np.zeros((data.shape[0], 32), dtype=np.int32)
    lo, hi = unpack_nibbles(data[:, start : start + 16])
    q = np.concatenate([lo, hi], axis=1) | high
    if has_min:
        return q.astype(np.float32) * d + half_at(data, 2)[:, None]
    return (q - (8 if ggml_type == "q4_0" else 16)).astype(np.float32) * d
