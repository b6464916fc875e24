"""q4_K, q5_K (8 sub-blocks of 32, x ≈ d·sc_j·q − dmin·m_j, 6-bit sc_j/m_j) and q6_K
(16 sub-blocks of 16, x ≈ d·sc_j·(q − 32), 8-bit signed sc_j), from ggml-quants.c.

q4_K/q5_K without importance (``quantize_row_q4_K_ref``): weights av_x + |x| with
av_x = √(Σx²/32) per sub-block, ``make_qkx2_quants``, sub-scales rounded on max/63; with it
(``_impl``): weights qw·√(σ² + x²), σ² = 2·Σx²/256, ``make_qkx3_quants`` and
``make_qp_quants`` for the sub-scales. q6_K: ``make_qx_quants`` with weights x² (_ref) or the
importance itself (_impl), sub-scales rounded on −max/128. All re-round each weight at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    nearest_int,
    rdiv,
    seq_sum,
    sqrtf,
)
from allocator.model.quant.ggml._search import make_qkx_quants, make_qp_quants, make_qx_quants

if TYPE_CHECKING:
    import torch

__all__ = ["dequantize_q45_K", "dequantize_q6_K", "quantize_q45_K", "quantize_q6_K"]


def _c_max(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for j: if (v[j] > m) m = v[j];`` (so +0.0 when nothing is positive)."""
    import torch

    m = v.amax(-1)
    return torch.where(m > 0, m, 0.0)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(sc, m) [S, 8] → 12 bytes: j < 4 in bytes j, j+4; j ≥ 4 split into nibbles and top bits."""
    import torch

    out = torch.cat([ls[:, :4], lm[:, :4], (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return (out & 0xFF).to(torch.uint8)


def _subscales(xs: torch.Tensor, qw: torch.Tensor | None, nmax: int, is_q5: bool):  # type: ignore[no-untyped-def]
    """Sub-block search and 6-bit sub-scales: (levels [S, 256], ls, lm, d, dmin as fp16)."""
    import torch

    s = xs.shape[0]
    sub = xs.reshape(s * 8, 32)
    if qw is None:
        av_x = sqrtf(seq_sum(sub * sub) / 32.0).unsqueeze(-1)
        rmin, nstep = (-0.5, 15) if is_q5 else (-1.0, 20)
        scales, mins, levels = make_qkx_quants(
            sub, av_x + sub.abs(), nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False
        )
        scales, mins = scales.reshape(s, 8), mins.reshape(s, 8)
        max_scale, max_min = _c_max(scales), _c_max(mins)
        inv_s = torch.where(max_scale > 0, rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
        inv_m = torch.where(max_min > 0, rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
        ls = (nearest_int(inv_s.unsqueeze(-1) * scales) & 0xFF).clamp(max=63)
        lm = (nearest_int(inv_m.unsqueeze(-1) * mins) & 0xFF).clamp(max=63)
        return levels.reshape(s, 256), ls, lm, fp16_round(max_scale / 63.0), fp16_round(max_min / 63.0)
    sigma2 = (seq_sum(xs * xs) * 2.0 / 256.0).unsqueeze(-1)
    w = (qw * sqrtf(sigma2 + xs * xs)).reshape(s * 8, 32)
    sw = seq_sum(w).reshape(s, 8)
    scales, mins, levels = make_qkx_quants(sub, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
    d_block, ls = make_qp_quants(scales.reshape(s, 8), 63, sw)
    m_block, lm = make_qp_quants(mins.reshape(s, 8), 63, sw)
    if is_q5:  # q5_K_impl clamps again, q4_K_impl does not
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    return levels.reshape(s, 256), ls, lm, fp16_round(d_block), fp16_round(m_block)


def quantize_q45_K(xs: torch.Tensor, qw: torch.Tensor | None, *, is_q5: bool) -> torch.Tensor:
    """Super-blocks [S, 256] → block_q4_K [S, 144] (d, dmin, scales, qs) or block_q5_K [S, 176]
    (d, dmin, scales, qh, qs)."""
    import torch

    s = xs.shape[0]
    nmax = 31 if is_q5 else 15
    levels, ls, lm, d, dmin = _subscales(xs, qw, nmax, is_q5)
    packed = _pack_k_scales(ls, lm)
    sc, m = k_scale_min(packed)
    d_j = d.float().unsqueeze(-1) * sc.float()
    m_j = (dmin.float().unsqueeze(-1) * m.float()).unsqueeze(-1)
    x = xs.reshape(s, 8, 32)
    safe = torch.where(d_j != 0, d_j, torch.ones_like(d_j)).unsqueeze(-1)
    new = nearest_int((x + m_j) / safe).clamp(0, nmax)
    levels = torch.where((d_j == 0).unsqueeze(-1), levels.reshape(s, 8, 32), new)
    pairs = levels.reshape(s, 4, 2, 32)  # chunk of 64: elements l and l + 32 share byte l
    qs = pack_nibbles(pairs[:, :, 0] & 0xF, pairs[:, :, 1] & 0xF).reshape(s, 128)
    parts = [fp16_bytes(d), fp16_bytes(dmin), packed]
    if is_q5:  # qh[l] bit 2c / 2c+1 = bit 4 of element 64c + l / 64c + 32 + l
        high = ((levels >> 4) & 1).reshape(s, 8, 32).transpose(1, 2).reshape(s, 256)
        parts.append(bits_to_bytes(high))
    return torch.cat([*parts, qs], dim=1)


def quantize_q6_K(xs: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Super-blocks [S, 256] → block_q6_K bytes [S, 210] (ql, qh, scales, d)."""
    import torch

    s = xs.shape[0]
    sub = xs.reshape(s * 16, 16)
    scales, levels = make_qx_quants(sub, 32, sub * sub if qw is None else qw.reshape(s * 16, 16))
    scales = scales.reshape(s, 16)
    max_abs, max_scale = first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(zero, 1.0, max_scale))
    d = fp16_round(torch.where(zero, 0.0, 1 / iscale))
    sc = nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127)
    sc = torch.where(zero.unsqueeze(-1), 0, ((sc + 128) & 0xFF) - 128)  # int8_t store
    d_j = d.float().unsqueeze(-1) * sc.float()
    x = xs.reshape(s, 16, 16)
    safe = torch.where(d_j != 0, d_j, torch.ones_like(d_j)).unsqueeze(-1)
    new = nearest_int(x / safe).clamp(-32, 31) + 32
    keep = (d_j == 0).unsqueeze(-1)
    lv = torch.where(keep, levels.reshape(s, 16, 16), new).reshape(s, 2, 4, 32)
    lv = torch.where(zero.reshape(s, 1, 1, 1), 0, lv)
    ql = torch.stack(
        [
            pack_nibbles(lv[:, :, 0] & 0xF, lv[:, :, 2] & 0xF),
            pack_nibbles(lv[:, :, 1] & 0xF, lv[:, :, 3] & 0xF),
        ],
        dim=2,
    ).reshape(s, 128)
    shifts = (2 * torch.arange(4)).reshape(1, 1, 4, 1)
    qh = (((lv >> 4) & 3) << shifts).sum(2).reshape(s, 64).to(torch.uint8)
    return torch.cat([ql, qh, (sc & 0xFF).to(torch.uint8), fp16_bytes(d)], dim=1)


def dequantize_q45_K(data: torch.Tensor, *, is_q5: bool) -> torch.Tensor:
    """``dequantize_row_q4_K`` / ``_q5_K``: y = (d·sc_j)·q − (dmin·m_j)."""
    import torch

    s = data.shape[0]
    sc, m = k_scale_min(data[:, 4:16])
    d_j = (half_at(data, 0).unsqueeze(-1) * sc.float()).unsqueeze(-1)
    m_j = (half_at(data, 2).unsqueeze(-1) * m.float()).unsqueeze(-1)
    lo, hi = unpack_nibbles(data[:, -128:].reshape(s, 4, 32))
    q = torch.stack([lo, hi], dim=2).reshape(s, 8, 32)
    if is_q5:
        high = unpack_bits(data[:, 16:48]).reshape(s, 32, 8).transpose(1, 2).reshape(s, 8, 32)
        q = q | (high << 4)
    return (d_j * q.float() - m_j).reshape(s, 256)


def dequantize_q6_K(data: torch.Tensor) -> torch.Tensor:
    """``dequantize_row_q6_K``: y = (d·sc_j)·(q − 32)."""
    import torch

    s = data.shape[0]
    lo, hi = unpack_nibbles(data[:, :128].reshape(s, 2, 2, 32))
    low = torch.stack([lo[:, :, 0], lo[:, :, 1], hi[:, :, 0], hi[:, :, 1]], dim=2)  # [s, 2, 4, 32]
    shifts = (2 * torch.arange(4)).reshape(1, 1, 4, 1)
    high = (data[:, 128:192].to(torch.int32).reshape(s, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)) - 32
    d_j = half_at(data, 208).unsqueeze(-1) * data[:, 192:208].view(torch.int8).float()
    return (d_j.unsqueeze(-1) * q.reshape(s, 16, 16).float()).reshape(s, 256)
