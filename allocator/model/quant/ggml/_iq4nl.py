"""iq4_nl: 32 weights on ggml's non-linear 4-bit grid ``kvalues_iq4nl`` with one fp16 scale.

This is ``quantize_iq4_nl`` (what ``llama-quantize`` calls, ``ntry = 7``), i.e.
``quantize_row_iq4_nl_impl(32, 32, …)``: weights w = qw·√(σ² + x²) with importance
(σ² = 2·Σx²/32 over the block) or w = x² without; d₀ = −max/−127 gives levels by nearest grid
value, d = Σwqx/Σwq²; then the 15 candidates 1/d = (t − 127)/max, t = −7 … 7, keep the d with
the largest (Σwqx)²/Σwq², and the final levels are the nearest grid values of x/d.
Blocks come element-major ``[32, N]``.
"""

from __future__ import annotations

import numpy as np

from allocator.model.quant.ggml._layout import IQ4NL_VALUES, fp16_bytes, half_at, pack_nibbles, unpack_nibbles
from allocator.model.quant.ggml._ops import GROUP_MAX_EPS, f32, first_absmax, fp16_round, rdiv, seq_sum

__all__ = ["best_index", "dequantize_iq4_nl", "quantize_iq4_nl"]

_NTRY = 7
_GRID = np.array(IQ4NL_VALUES, dtype=np.float32)
_LO, _HI = IQ4NL_VALUES[0], IQ4NL_VALUES[15]
# The grid is integers, so v_k ≤ x ⟺ v_k ≤ floor(x): C's binary search's upper index
# mu = #{k: v_k ≤ x} (clamped to 1 … 15) is a table lookup on floor(x) − v_0.
_MU = np.clip(np.searchsorted(_GRID, np.arange(_LO, _HI + 1, dtype=np.float32), side="right"), 1, 15)
_BELOW = _GRID[_MU - 1]
_ABOVE = _GRID[_MU]
_GAP = _ABOVE - _BELOW
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x clamped to the grid's range, index mu, v[mu − 1], v[mu]) of C's binary search."""
    xc = np.clip(x, np.float32(_LO), np.float32(_HI))
    k = np.floor(xc).astype(np.intp)
    k -= _LO
    return xc, k, np.take(_BELOW, k), np.take(_ABOVE, k)


def _lower(xc: np.ndarray, below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """C's ``x − v[mu−1] < v[mu] − x`` in float32."""
    return np.less(np.subtract(xc, below), np.subtract(above, xc))


def best_index(x: np.ndarray) -> np.ndarray:
    """``best_index_int8(16, kvalues_iq4nl, x)``: the nearest grid value, the lower one unless the
    upper is strictly nearer (``x − v[mu−1] < v[mu] − x ? mu−1 : mu``); x ≤ v₀ → 0, x ≥ v₁₅ → 15."""
    xc, k, below, above = _neighbours(x)
    return (np.take(_MU, k) - _lower(xc, below, above)).astype(np.int32)


def _grid_values(x: np.ndarray) -> np.ndarray:
    """``values[best_index(x)]`` as float32: v[mu] − [lower]·(v[mu] − v[mu−1]), exact in float32
    (small integers), and without a data-dependent branch (``np.where`` on a random mask is slow)."""
    xc = np.clip(x, np.float32(_LO), np.float32(_HI))
    k = np.floor(xc).astype(np.intp)
    k -= _LO
    above, gap = np.take(_ABOVE, k), np.take(_GAP, k)
    gap *= _lower(xc, above - gap, above)
    above -= gap
    return above


def _sums(x: np.ndarray, w: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ (w·q)·x and Σ (w·q)·q for q = grid[best_index(inv·x)], summed as C does."""
    q = _grid_values(inv * x)
    wq = w * q
    return seq_sum(wq * x), seq_sum(wq * q)


def quantize_iq4_nl(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Element-major blocks [32, N] (importance per weight [32, N] or None) → block_iq4_nl bytes [N, 18]."""
    sq = blocks * blocks
    if qw is not None:
        sigma2 = seq_sum(sq) * f32(2.0 / 32)
        w = qw * np.sqrt(sigma2 + sq)
    else:
        w = sq
    amax, mx = first_absmax(blocks)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _ONE, mx)
    d0 = (-mx) / np.float32(IQ4NL_VALUES[0])
    sumqx, sumq2 = _sums(blocks, w, _ONE / d0)
    pos = sumq2 > 0
    d = np.where(pos, sumqx / np.where(pos, sumq2, _ONE), _ZERO)
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        sqx, sq2 = _sums(blocks, w, rdiv(float(itry + IQ4NL_VALUES[0]), mx))
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        if take.any():
            np.copyto(d, sqx / np.where(take, sq2, _ONE), where=take)
            np.copyto(best, d * sqx, where=take)
    d = np.where(zero, _ZERO, d)
    nz = d != 0
    inv = np.where(nz, _ONE / np.where(nz, d, _ONE), _ZERO)
    levels = best_index(inv * blocks).T
    return np.concatenate([fp16_bytes(fp16_round(d)), pack_nibbles(levels[:, :16], levels[:, 16:])], axis=1)


def dequantize_iq4_nl(data: np.ndarray) -> np.ndarray:
    """``dequantize_row_iq4_nl``: y = d · kvalues[q]."""
    lo, hi = unpack_nibbles(data[:, 2:18])
    return half_at(data, 0)[:, None] * _GRID[np.concatenate([lo, hi], axis=1)]
