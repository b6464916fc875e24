"""q2_K and q3_K: 256-weight super-blocks of 16 sub-blocks of 16 (ggml-quants.c).

q2_K, x ≈ d·sc_j·q − dmin·m_j with q ∈ 0…3 and 4-bit sc_j, m_j. Without importance
(``quantize_row_q2_K_ref``) each sub-block gets ``make_qkx2_quants`` (weights |x|, MAD error)
and the sub-scales are rounded on max/15; with importance (``quantize_row_q2_K_impl``) the
weights are qw·√(σ² + x²), ``make_qkx3_quants`` and ``make_qp_quants`` quantize the
sub-scales. q3_K, x ≈ d·sc_j·q with q ∈ −4…3 and 6-bit signed sc_j: ``make_q3_quants`` (_ref)
or ``make_qx_quants`` on the weights (_impl), sub-scales rounded on −max/32 or by
``make_qx_quants`` of the weighted sums. Both then re-round every weight on its final grid.
"""

from __future__ import annotations

import numpy as np

from allocator.model.quant.ggml._k_high import requantize
from allocator.model.quant.ggml._layout import (
    bits_to_bytes,
    fp16_bytes,
    half_at,
    pack_2bit,
    unpack_2bit,
    unpack_bits,
)
from allocator.model.quant.ggml._ops import (
    first_absmax,
    fp16_round,
    from_subblocks,
    nearest_int,
    per_block,
    rdiv,
    seq_sum,
    to_subblocks,
)
from allocator.model.quant.ggml._search import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants

__all__ = ["dequantize_q2_K", "dequantize_q3_K", "quantize_q2_K", "quantize_q3_K"]

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_SHIFT4 = (2 * np.arange(4, dtype=np.int32)).reshape(1, 4, 1)


def _weights(xs: np.ndarray, qw: np.ndarray, factor: float) -> np.ndarray:
    """w = qw·√(σ² + x²) with σ² = factor·Σx²/256 over the super-block, as sub-blocks [16, 16·S]."""
    sigma2 = (seq_sum((xs * xs).T) * np.float32(factor) / np.float32(256.0))[:, None]
    return to_subblocks(qw * np.sqrt(sigma2 + xs * xs), 16)


def _rounded_on_15(values: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """``nearest_int(15/max · v)`` per sub-block (0 where max ≤ 0), values element-major [16, S]."""
    has = vmax > 0
    return np.where(has, nearest_int(rdiv(15.0, np.where(has, vmax, _ONE)) * values), 0)


def quantize_q2_K(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Super-blocks [S, 256] → block_q2_K bytes [S, 84] (scales, qs, d, dmin)."""
    s = xs.shape[0]
    sub = to_subblocks(xs, 16)
    if qw is None:
        scales, mins, levels = make_qkx_quants(
            sub, np.abs(sub), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True
        )
        scales, mins = per_block(scales, s), per_block(mins, s)
        max_scale, max_min = scales.max(axis=0), mins.max(axis=0)
        ls, lm = _rounded_on_15(scales, max_scale), _rounded_on_15(mins, max_min)
        d = fp16_round(np.where(max_scale > 0, max_scale / np.float32(15.0), _ZERO))
        dmin = fp16_round(np.where(max_min > 0, max_min / np.float32(15.0), _ZERO))
    else:
        w = _weights(xs, qw, 1.0)
        sw = per_block(seq_sum(w), s)
        scales, mins, levels = make_qkx_quants(sub, w, 3, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
        dm, ls = make_qp_quants(per_block(scales, s), 15, sw)
        mm, lm = make_qp_quants(per_block(mins, s), 15, sw)
        d, dmin = fp16_round(dm), fp16_round(mm)
    sc = (((ls & 0xFF) | (lm << 4)) & 0xFF).T
    d_j = d.astype(np.float32)[:, None] * (sc & 0xF).astype(np.float32)
    m_j = dmin.astype(np.float32)[:, None] * (sc >> 4).astype(np.float32)
    lv = requantize(xs, from_subblocks(levels, s), d_j, m_j, 0, 3)
    return np.concatenate([sc.astype(np.uint8), pack_2bit(lv), fp16_bytes(d), fp16_bytes(dmin)], axis=1)


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """16 six-bit scales [S, 16] → the 12 bytes of block_q3_K.scales (low nibbles, then 2-bit highs)."""
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = ((l6 >> 4).reshape(-1, 4, 4) << _SHIFT4).sum(1)
    return (np.concatenate([low, high], axis=1) & 0xFF).astype(np.uint8)


def _q3_scales(packed: np.ndarray) -> np.ndarray:
    """block_q3_K.scales bytes [S, 12] → signed scales sc_j − 32 [S, 16] (int32)."""
    b = packed.astype(np.int32)
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    high = (b[:, None, 8:12] >> _SHIFT4) & 3
    return (low | (high.reshape(-1, 16) << 4)) - 32


def quantize_q3_K(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Super-blocks [S, 256] → block_q3_K bytes [S, 110] (hmask, qs, scales, d)."""
    s = xs.shape[0]
    sub = to_subblocks(xs, 16)
    if qw is None:
        scales, levels = make_q3_quants(sub, 4)
        scales = per_block(scales, s)
        _, max_scale = first_absmax(scales)
        nz = max_scale != 0
        iscale = rdiv(-32.0, np.where(nz, max_scale, _ONE))
        l8 = nearest_int(iscale * scales)
        l8 = ((l8 + 128) & 0xFF) - 128  # stored in an int8_t before clamping
        l6 = np.where(nz, np.clip(l8, -32, 31) + 32, 0)
        d = fp16_round(np.where(nz, _ONE / iscale, _ZERO))
    else:
        w = _weights(xs, qw, 2.0)
        sw = per_block(seq_sum(w), s)
        scales, levels = make_qx_quants(sub, 4, w)
        d_block, l6 = make_qx_quants(per_block(scales, s), 32, sw)
        d = fp16_round(d_block)
    packed = _pack_q3_scales(np.ascontiguousarray(l6.T))
    d_j = d.astype(np.float32)[:, None] * _q3_scales(packed).astype(np.float32)
    lv = requantize(xs, from_subblocks(levels, s), d_j, None, -4, 3)
    hmask = bits_to_bytes((lv > 3).astype(np.int32).reshape(s, 8, 32).transpose(0, 2, 1).reshape(s, 256))
    return np.concatenate([hmask, pack_2bit(lv), packed, fp16_bytes(d)], axis=1)


def dequantize_q2_K(data: np.ndarray) -> np.ndarray:
    """``dequantize_row_q2_K``: y = (d·sc_j)·q − dmin·m_j."""
    sc = data[:, :16].astype(np.int32)
    dl = half_at(data, 80)[:, None] * (sc & 0xF).astype(np.float32)
    ml = half_at(data, 82)[:, None] * (sc >> 4).astype(np.float32)
    q = unpack_2bit(data[:, 16:80]).reshape(-1, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, 256)


def dequantize_q3_K(data: np.ndarray) -> np.ndarray:
    """``dequantize_row_q3_K``: y = (d·(sc_j − 32))·(q − 4·[hmask bit clear])."""
    s = data.shape[0]
    high = unpack_bits(data[:, :32]).reshape(s, 32, 8).transpose(0, 2, 1).reshape(s, 256)
    q = unpack_2bit(data[:, 32:96]) - 4 * (1 - high)
    dl = half_at(data, 108)[:, None] * _q3_scales(data[:, 96:108]).astype(np.float32)
    return (dl[:, :, None] * q.reshape(s, 16, 16).astype(np.float32)).reshape(s, 256)
