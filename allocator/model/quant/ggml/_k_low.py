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

from typing import TYPE_CHECKING

from allocator.model.quant.ggml._layout import (
    bits_to_bytes,
    fp16_bytes,
    half_at,
    pack_2bit,
    unpack_2bit,
    unpack_bits,
)
from allocator.model.quant.ggml._ops import first_absmax, fp16_round, nearest_int, rdiv, seq_sum, sqrtf
from allocator.model.quant.ggml._search import make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants

if TYPE_CHECKING:
    import torch

__all__ = ["dequantize_q2_K", "dequantize_q3_K", "quantize_q2_K", "quantize_q3_K"]


def _weights(xs: torch.Tensor, qw: torch.Tensor, factor: float) -> torch.Tensor:
    """w = qw·√(σ² + x²) with σ² = factor·Σx²/256 over the super-block."""

    sigma2 = (seq_sum(xs * xs) * factor / 256.0).unsqueeze(-1)
    return qw * sqrtf(sigma2 + xs * xs)


def _requantize(
    xs: torch.Tensor, levels: torch.Tensor, d_j: torch.Tensor, shift: torch.Tensor | None, lo: int, hi: int
) -> torch.Tensor:
    """``l = clamp(nearest_int((x + m_j)/d_j))`` where d_j ≠ 0, else the search's levels."""
    import torch

    s = xs.shape[0]
    x = xs.reshape(s, -1, 16)
    num = x if shift is None else x + shift.unsqueeze(-1)
    safe = torch.where(d_j != 0, d_j, torch.ones_like(d_j)).unsqueeze(-1)
    new = nearest_int(num / safe).clamp(lo, hi) - lo
    keep = (d_j == 0).unsqueeze(-1)
    return torch.where(keep, levels.reshape(s, -1, 16), new).reshape(s, 256)


def quantize_q2_K(xs: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Super-blocks [S, 256] → block_q2_K bytes [S, 84] (scales, qs, d, dmin)."""
    import torch

    s = xs.shape[0]
    sub = xs.reshape(s * 16, 16)
    if qw is None:
        scales, mins, levels = make_qkx_quants(
            sub, sub.abs(), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True
        )
        scales, mins = scales.reshape(s, 16), mins.reshape(s, 16)
        max_scale, max_min = scales.amax(-1), mins.amax(-1)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = nearest_int(rdiv(15.0, torch.where(has_s, max_scale, 1.0)).unsqueeze(-1) * scales)
        lm = nearest_int(rdiv(15.0, torch.where(has_m, max_min, 1.0)).unsqueeze(-1) * mins)
        ls = torch.where(has_s.unsqueeze(-1), ls, 0)
        lm = torch.where(has_m.unsqueeze(-1), lm, 0)
        d = fp16_round(torch.where(has_s, max_scale / 15.0, 0.0))
        dmin = fp16_round(torch.where(has_m, max_min / 15.0, 0.0))
    else:
        w = _weights(xs, qw, 1.0)
        sw = seq_sum(w.reshape(s, 16, 16))
        scales, mins, levels = make_qkx_quants(
            sub, w.reshape(s * 16, 16), 3, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
        )
        dm, ls = make_qp_quants(scales.reshape(s, 16), 15, sw)
        mm, lm = make_qp_quants(mins.reshape(s, 16), 15, sw)
        d, dmin = fp16_round(dm), fp16_round(mm)
    sc = ((ls & 0xFF) | (lm << 4)) & 0xFF
    d_j = d.float().unsqueeze(-1) * (sc & 0xF).float()
    m_j = dmin.float().unsqueeze(-1) * (sc >> 4).float()
    levels = _requantize(xs, levels.reshape(s, 256), d_j, m_j, 0, 3)
    return torch.cat([sc.to(torch.uint8), pack_2bit(levels), fp16_bytes(d), fp16_bytes(dmin)], dim=1)


def _pack_q3_scales(l6: torch.Tensor) -> torch.Tensor:
    """16 six-bit scales [S, 16] → the 12 bytes of block_q3_K.scales (low nibbles, then 2-bit highs)."""
    import torch

    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = ((l6 >> 4).reshape(-1, 4, 4) << (2 * torch.arange(4)).reshape(1, 4, 1)).sum(1)
    return (torch.cat([low, high], dim=1) & 0xFF).to(torch.uint8)


def _q3_scales(packed: torch.Tensor) -> torch.Tensor:
    """block_q3_K.scales bytes [S, 12] → signed scales sc_j − 32 [S, 16] (int32)."""
    import torch

    b = packed.to(torch.int32)
    low = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], dim=1)
    high = (b[:, 8:12].unsqueeze(1) >> (2 * torch.arange(4)).reshape(1, 4, 1)) & 3
    return (low | (high.reshape(-1, 16) << 4)) - 32


def quantize_q3_K(xs: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Super-blocks [S, 256] → block_q3_K bytes [S, 110] (hmask, qs, scales, d)."""
    import torch

    s = xs.shape[0]
    sub = xs.reshape(s * 16, 16)
    if qw is None:
        scales, levels = make_q3_quants(sub, 4)
        scales = scales.reshape(s, 16)
        _, max_scale = first_absmax(scales)
        nz = max_scale != 0
        iscale = rdiv(-32.0, torch.where(nz, max_scale, 1.0))
        l8 = nearest_int(iscale.unsqueeze(-1) * scales)
        l8 = ((l8 + 128) & 0xFF) - 128  # stored in an int8_t before clamping
        l6 = torch.where(nz.unsqueeze(-1), l8.clamp(-32, 31) + 32, 0)
        d = fp16_round(torch.where(nz, 1 / iscale, 0.0))
    else:
        w = _weights(xs, qw, 2.0)
        sw = seq_sum(w.reshape(s, 16, 16))
        scales, levels = make_qx_quants(sub, 4, w.reshape(s * 16, 16))
        d_block, l6 = make_qx_quants(scales.reshape(s, 16), 32, sw)
        d = fp16_round(d_block)
    packed = _pack_q3_scales(l6)
    d_j = d.float().unsqueeze(-1) * _q3_scales(packed).float()
    levels = _requantize(xs, levels.reshape(s, 256), d_j, None, -4, 3)
    hmask = bits_to_bytes((levels > 3).to(torch.int32).reshape(s, 8, 32).transpose(1, 2).reshape(s, 256))
    return torch.cat([hmask, pack_2bit(levels), packed, fp16_bytes(d)], dim=1)


def dequantize_q2_K(data: torch.Tensor) -> torch.Tensor:
    """``dequantize_row_q2_K``: y = (d·sc_j)·q − dmin·m_j."""
    sc = data[:, :16].int()
    dl = half_at(data, 80).unsqueeze(-1) * (sc & 0xF).float()
    ml = half_at(data, 82).unsqueeze(-1) * (sc >> 4).float()
    q = unpack_2bit(data[:, 16:80]).reshape(-1, 16, 16).float()
    return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(-1, 256)


def dequantize_q3_K(data: torch.Tensor) -> torch.Tensor:
    """``dequantize_row_q3_K``: y = (d·(sc_j − 32))·(q − 4·[hmask bit clear])."""
    s = data.shape[0]
    high = unpack_bits(data[:, :32]).reshape(s, 32, 8).transpose(1, 2).reshape(s, 256)
    q = unpack_2bit(data[:, 32:96]) - 4 * (1 - high)
    dl = half_at(data, 108).unsqueeze(-1) * _q3_scales(data[:, 96:108]).float()
    return (dl.unsqueeze(-1) * q.reshape(s, 16, 16).float()).reshape(s, 256)
