"""q4_K, q5_K (8 sub-blocks of 32, x ≈ d·sc_j·q − dmin·m_j, 6-bit sc_j/m_j) and q6_K
(16 sub-blocks of 16, x ≈ d·sc_j·(q − 32), 8-bit signed sc_j), from ggml-quants.c.

q4_K/q5_K without importance (``quantize_row_q4_K_ref``): weights av_x + |x| with
av_x = √(Σx²/32) per sub-block, ``make_qkx2_quants``, sub-scales rounded on max/63; with it
(``_impl``): weights qw·√(σ² + x²), σ² = 2·Σx²/256, ``make_qkx3_quants`` and
``make_qp_quants`` for the sub-scales. q6_K: ``make_qx_quants`` with weights x² (_ref) or the
importance itself (_impl), sub-scales rounded on −max/128. All re-round each weight at the end.
Super-blocks come block-major ``[S, 256]``; the searches run on element-major sub-blocks.
"""

from __future__ import annotations

import numpy as np

from allocator.model.quant.ggml._layout import (
    bits_to_bytes,
    fp16_bytes,
    half_at,
    k_scale_min,
    pack_nibbles,
    unpack_bits,
    unpack_nibbles,
)
from allocator.model.quant.ggml._ops import (
    GROUP_MAX_EPS,
    first_absmax,
    fp16_round,
    from_subblocks,
    nearest_int,
    per_block,
    rdiv,
    seq_sum,
    to_subblocks,
)
from allocator.model.quant.ggml._search import make_qkx_quants, make_qp_quants, make_qx_quants

__all__ = ["dequantize_q45_K", "dequantize_q6_K", "quantize_q45_K", "quantize_q6_K", "requantize"]

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


def _c_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; for j: if (v[j] > m) m = v[j];`` over axis 0 (so +0.0 when nothing is positive)."""
    m = v.max(axis=0)
    return np.where(m > 0, m, _ZERO)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(sc, m) [S, 8] → 12 bytes: j < 4 in bytes j, j+4; j ≥ 4 split into nibbles and top bits."""
    out = np.concatenate([ls[:, :4], lm[:, :4], (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return (out & 0xFF).astype(np.uint8)


def _rounded_on(values: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """``MIN(63, (uint8_t)nearest_int(63/max · v))`` (0 where max = 0)."""
    inv = np.where(vmax > 0, rdiv(63.0, np.where(vmax > 0, vmax, _ONE)), _ZERO)
    return np.minimum(nearest_int(inv * values) & 0xFF, 63)


def _subscales(xs: np.ndarray, qw: np.ndarray | None, nmax: int, is_q5: bool):  # type: ignore[no-untyped-def]
    """Sub-block search and 6-bit sub-scales: (levels [S, 256], ls, lm [S, 8], d, dmin as fp16)."""
    s = xs.shape[0]
    sub = to_subblocks(xs, 32)
    if qw is None:
        av_x = np.sqrt(seq_sum(sub * sub) / np.float32(32.0))
        rmin, nstep = (-0.5, 15) if is_q5 else (-1.0, 20)
        scales, mins, levels = make_qkx_quants(
            sub, av_x + np.abs(sub), nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False
        )
        scales, mins = per_block(scales, s), per_block(mins, s)
        max_scale, max_min = _c_max(scales), _c_max(mins)
        ls, lm = _rounded_on(scales, max_scale), _rounded_on(mins, max_min)
        d, dmin = fp16_round(max_scale / np.float32(63.0)), fp16_round(max_min / np.float32(63.0))
        return from_subblocks(levels, s), ls.T, lm.T, d, dmin
    sigma2 = (seq_sum((xs * xs).T) * np.float32(2.0) / np.float32(256.0))[:, None]
    w = to_subblocks(qw * np.sqrt(sigma2 + xs * xs), 32)
    sw = per_block(seq_sum(w), s)
    scales, mins, levels = make_qkx_quants(sub, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
    d_block, ls = make_qp_quants(per_block(scales, s), 63, sw)
    m_block, lm = make_qp_quants(per_block(mins, s), 63, sw)
    if is_q5:  # q5_K_impl clamps again, q4_K_impl does not
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return from_subblocks(levels, s), ls.T, lm.T, fp16_round(d_block), fp16_round(m_block)


def requantize(
    xs: np.ndarray, levels: np.ndarray, d_j: np.ndarray, m_j: np.ndarray | None, lo: int, hi: int
) -> np.ndarray:
    """``l = clamp(nearest_int((x + m_j)/d_j), lo, hi) − lo`` where d_j ≠ 0, else the search's
    levels; xs/levels [S, 256], d_j/m_j per sub-block [S, k]."""
    s, k = d_j.shape
    x = xs.reshape(s, k, -1)
    num = x if m_j is None else x + m_j[:, :, None]
    keep = d_j == 0
    new = nearest_int(num / np.where(keep, _ONE, d_j)[:, :, None])
    new = np.clip(new, lo, hi) - lo
    return np.where(keep[:, :, None], levels.reshape(s, k, -1), new).reshape(s, -1)


def quantize_q45_K(xs: np.ndarray, qw: np.ndarray | None, *, is_q5: bool) -> np.ndarray:
    """Super-blocks [S, 256] → block_q4_K [S, 144] (d, dmin, scales, qs) or block_q5_K [S, 176]
    (d, dmin, scales, qh, qs)."""
    s = xs.shape[0]
    nmax = 31 if is_q5 else 15
    levels, ls, lm, d, dmin = _subscales(xs, qw, nmax, is_q5)
    packed = _pack_k_scales(ls, lm)
    sc, m = k_scale_min(packed)
    d_j = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    m_j = dmin.astype(np.float32)[:, None] * m.astype(np.float32)
    levels = requantize(xs, levels, d_j, m_j, 0, nmax)
    pairs = levels.reshape(s, 4, 2, 32)  # chunk of 64: elements l and l + 32 share byte l
    qs = pack_nibbles(pairs[:, :, 0] & 0xF, pairs[:, :, 1] & 0xF).reshape(s, 128)
    parts = [fp16_bytes(d), fp16_bytes(dmin), packed]
    if is_q5:  # qh[l] bit 2c / 2c+1 = bit 4 of element 64c + l / 64c + 32 + l
        high = ((levels >> 4) & 1).reshape(s, 8, 32).transpose(0, 2, 1).reshape(s, 256)
        parts.append(bits_to_bytes(high))
    return np.concatenate([*parts, qs], axis=1)


def quantize_q6_K(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Super-blocks [S, 256] → block_q6_K bytes [S, 210] (ql, qh, scales, d)."""
    s = xs.shape[0]
    sub = to_subblocks(xs, 16)
    scales, levels = make_qx_quants(sub, 32, sub * sub if qw is None else to_subblocks(qw, 16))
    scales = per_block(scales, s)
    max_abs, max_scale = first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = rdiv(-128.0, np.where(zero, _ONE, max_scale))
    d = fp16_round(np.where(zero, _ZERO, _ONE / iscale))
    sc = np.minimum(nearest_int(iscale * scales), 127).T
    sc = np.where(zero[:, None], 0, ((sc + 128) & 0xFF) - 128)  # int8_t store
    d_j = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    lv = requantize(xs, from_subblocks(levels, s), d_j, None, -32, 31).reshape(s, 2, 4, 32)
    lv = np.where(zero.reshape(s, 1, 1, 1), 0, lv)
    ql = np.stack(
        [
            pack_nibbles(lv[:, :, 0] & 0xF, lv[:, :, 2] & 0xF),
            pack_nibbles(lv[:, :, 1] & 0xF, lv[:, :, 3] & 0xF),
        ],
        axis=2,
    ).reshape(s, 128)
    shifts = (2 * np.arange(4, dtype=np.int32)).reshape(1, 1, 4, 1)
    qh = (((lv >> 4) & 3) << shifts).sum(2).reshape(s, 64).astype(np.uint8)
    return np.concatenate([ql, qh, (sc & 0xFF).astype(np.uint8), fp16_bytes(d)], axis=1)


def dequantize_q45_K(data: np.ndarray, *, is_q5: bool) -> np.ndarray:
    """``dequantize_row_q4_K`` / ``_q5_K``: y = (d·sc_j)·q − (dmin·m_j)."""
    s = data.shape[0]
    sc, m = k_scale_min(data[:, 4:16])
    d_j = (half_at(data, 0)[:, None] * sc.astype(np.float32))[:, :, None]
    m_j = (half_at(data, 2)[:, None] * m.astype(np.float32))[:, :, None]
    lo, hi = unpack_nibbles(data[:, -128:].reshape(s, 4, 32))
    q = np.stack([lo, hi], axis=2).reshape(s, 8, 32)
    if is_q5:
        high = unpack_bits(data[:, 16:48]).reshape(s, 32, 8).transpose(0, 2, 1).reshape(s, 8, 32)
        q = q | (high << 4)
    return (d_j * q.astype(np.float32) - m_j).reshape(s, 256)


def dequantize_q6_K(data: np.ndarray) -> np.ndarray:
    """``dequantize_row_q6_K``: y = (d·sc_j)·(q − 32)."""
    s = data.shape[0]
    lo, hi = unpack_nibbles(data[:, :128].reshape(s, 2, 2, 32))
    low = np.stack([lo[:, :, 0], lo[:, :, 1], hi[:, :, 0], hi[:, :, 1]], axis=2)  # [s, 2, 4, 32]
    shifts = (2 * np.arange(4, dtype=np.int32)).reshape(1, 1, 4, 1)
    high = (data[:, 128:192].astype(np.int32).reshape(s, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)) - 32
    sc = np.ascontiguousarray(data[:, 192:208]).view(np.int8).astype(np.float32)
    d_j = half_at(data, 208)[:, None] * sc
    return (d_j[:, :, None] * q.reshape(s, 16, 16).astype(np.float32)).reshape(s, 256)
