"""iq4_nl: 32 weights on ggml's non-linear 4-bit grid ``kvalues_iq4nl`` with one fp16 scale.

This is ``quantize_iq4_nl`` (what ``llama-quantize`` calls, ``ntry = 7``), i.e.
``quantize_row_iq4_nl_impl(32, 32, …)``: weights w = qw·√(σ² + x²) with importance
(σ² = 2·Σx²/32 over the block) or w = x² without; d₀ = −max/−127 gives levels by nearest grid
value, d = Σwqx/Σwq²; then the 15 candidates 1/d = (t − 127)/max, t = −7 … 7, keep the d with
the largest (Σwqx)²/Σwq², and the final levels are the nearest grid values of x/d.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from allocator.model.quant.ggml._layout import IQ4NL_VALUES, fp16_bytes, half_at, pack_nibbles, unpack_nibbles
from allocator.model.quant.ggml._ops import GROUP_MAX_EPS, f32, first_absmax, fp16_round, rdiv, seq_sum, sqrtf

if TYPE_CHECKING:
    import torch

__all__ = ["best_index", "dequantize_iq4_nl", "quantize_iq4_nl"]

_NTRY = 7


def _grid() -> torch.Tensor:
    import torch

    return torch.tensor(IQ4NL_VALUES, dtype=torch.float32)


def best_index(x: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, x)``: the nearest grid value, the lower one unless the
    upper is strictly nearer (``x − v[mu−1] < v[mu] − x ? mu−1 : mu``)."""
    import torch

    grid = _grid()
    mu = torch.ones_like(x, dtype=torch.int64)  # the binary search's upper index: 1 + #{v_k ≤ x, k ≥ 1}
    for v in IQ4NL_VALUES[1:15]:
        mu += x >= v
    lower = (x - torch.take(grid, mu - 1)) < (torch.take(grid, mu) - x)
    idx = mu - lower.long()
    idx = torch.where(x <= IQ4NL_VALUES[0], 0, idx)
    return torch.where(x >= IQ4NL_VALUES[15], 15, idx).to(torch.int32)


def _sums(x: torch.Tensor, w: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·q·x and Σ w·q·q for q = grid[best_index(inv·x)], summed as C does."""
    import torch

    q = torch.take(_grid(), best_index(inv * x).long())
    return seq_sum(w * q * x), seq_sum(w * q * q)


def quantize_iq4_nl(blocks: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Blocks [N, 32] (importance per weight [N, 32] or None) → block_iq4_nl bytes [N, 18]."""
    import torch

    sigma2 = seq_sum(blocks * blocks) * f32(2.0 / 32)
    if qw is not None:
        w = qw * sqrtf(sigma2.unsqueeze(-1) + blocks * blocks)
    else:
        w = blocks * blocks
    amax, mx = first_absmax(blocks)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx).unsqueeze(-1)
    d0 = (-mx) / float(IQ4NL_VALUES[0])
    sumqx, sumq2 = _sums(blocks, w, 1 / d0)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumq2))
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        sqx, sq2 = _sums(blocks, w, rdiv(float(itry + IQ4NL_VALUES[0]), mx))
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(take, sqx / sq2, d)
        best = torch.where(take, d * sqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    levels = best_index(inv.unsqueeze(-1) * blocks)
    return torch.cat([fp16_bytes(fp16_round(d)), pack_nibbles(levels[:, :16], levels[:, 16:])], dim=1)


def dequantize_iq4_nl(data: torch.Tensor) -> torch.Tensor:
    """``dequantize_row_iq4_nl``: y = d · kvalues[q]."""
    import torch

    lo, hi = unpack_nibbles(data[:, 2:18])
    return half_at(data, 0).unsqueeze(-1) * _grid()[torch.cat([lo, hi], dim=1).long()]
