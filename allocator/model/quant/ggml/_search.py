"""ggml's scale searches (ggml-quants.c), vectorised over blocks, in C's float32 operation order.

Every function takes element-major blocks ``x`` of shape ``[n, N]`` (see :mod:`._ops`; weights
of the same shape) and runs C's per-block loop for all ``N`` blocks at once; the loops that
remain are over C's candidate scales (and the elements of the coordinate descents), never over
blocks. A candidate's levels are recomputed once from the winning scale rather than kept per
candidate (they are a function of it). Levels are returned as int32 ``[n, N]`` holding the
values C stores in its ``L`` arrays (offsets, and the ``uint8_t`` wrap of ``make_qp_quants``).
"""

from __future__ import annotations

import numpy as np

from allocator.model.quant.ggml._ops import (
    GROUP_MAX_EPS,
    f32,
    first_absmax,
    first_max,
    first_min,
    nearest_int,
    rdiv,
    seq_sum,
)

__all__ = ["make_q3_quants", "make_qkx_quants", "make_qp_quants", "make_qx_quants"]

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_RINT_SAFE = np.float32(1 << 22)


def _ls(wx: np.ndarray, w: np.ndarray, lf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ (w·x)·l and Σ (w·l)·l, summed as C does (``sumlx += w*x[i]*l; suml2 += w*l*l``)."""
    return seq_sum(wx * lf), seq_sum(w * lf * lf)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w)``: symmetric scale d and levels L + nmax.

    Starting from iscale = −nmax / max (max = the signed element of largest |x|), it tries
    iscale = −(nmax + 0.1·is) / max for is = −9 … 9 and keeps the scale d = Σwxl / Σwl² of the
    candidate maximising (Σwxl)² / Σwl² (the weighted least-squares fit of x ≈ d·l).
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _ONE, mx)
    wx = w * x

    def levels(iscale: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(iscale * x), -nmax, nmax - 1)

    best_is = rdiv(-nmax, mx)
    sumlx, suml2 = _ls(wx, w, levels(best_is).astype(np.float32))
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _ONE), _ZERO)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = rdiv(-(f32(nmax) + f32(f32(0.1) * step)), mx)
        slx, sl2 = _ls(wx, w, levels(iscale).astype(np.float32))
        take = (sl2 > 0) & (slx * slx > best * sl2)
        if take.any():
            np.copyto(best_is, iscale, where=take)
            np.copyto(scale, slx / np.where(take, sl2, _ONE), where=take)
            np.copyto(best, scale * slx, where=take)
    best_l = np.where(zero, 0, levels(best_is) + nmax)
    return np.where(zero, _ZERO, scale), best_l


def _refine(
    x: np.ndarray,
    w: np.ndarray,
    levels: np.ndarray,
    sums: tuple[np.ndarray, np.ndarray],
    *,
    lo: int | None,
    hi: int,
    wrap: bool,
    need_sl2: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C's coordinate descent of ``make_q3_quants``/``make_qp_quants`` (5 sweeps over i).

    Each element in turn moves to l' = nearest_int(x·Σ'wl² / Σ'wxl) (Σ' = the sums without it)
    if that raises (Σwxl)²/Σwl². A sweep that changes no block changes nothing after it either,
    so stopping there equals C's per-block ``break``.
    """
    sumlx, suml2 = sums
    levels = levels.copy()
    for _ in range(5):
        changed_any = False
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], levels[i]
            lf = li.astype(np.float32)
            slx = sumlx - wi * xi * lf
            sl2 = suml2 - wi * lf * lf
            ok = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            if not ok.any():
                continue
            new = nearest_int(xi * sl2 / np.where(ok, slx, _ONE))
            new = np.clip(new, lo, hi) if lo is not None else np.minimum(new, hi)
            nf = new.astype(np.float32)
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            better = slx2 * slx2 * suml2 > sumlx * sumlx * sl22
            if not need_sl2:
                better &= sl22 > 0
            accept = ok & (new != li) & better
            if accept.any():
                np.copyto(li, new & 0xFF if wrap else new, where=accept)
                np.copyto(sumlx, slx2, where=accept)
                np.copyto(suml2, sl22, where=accept)
                changed_any = True
        if not changed_any:
            break
    return levels, sumlx, suml2


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: RTN at −nmax/max, then weighted (w = x²)
    coordinate descent; returns d = Σwxl / Σwl² and levels L + nmax (0 for an all-zero block)."""
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _ONE, mx)
    levels = np.clip(nearest_int(rdiv(-nmax, mx) * x), -nmax, nmax - 1)
    w = x * x
    sums = _ls(w * x, w, levels.astype(np.float32))
    levels, sumlx, suml2 = _refine(x, w, levels, sums, lo=-nmax, hi=nmax - 1, wrap=False, need_sl2=False)
    pos = suml2 > 0
    scale = np.where(pos, sumlx / np.where(pos, suml2, _ONE), _ZERO)
    levels = np.where(zero, 0, levels + nmax)
    return np.where(zero, _ZERO, scale), levels


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights=w)``: a positive scale for non-negative x.

    Tries iscale = (nmax + 0.1·is)/max for is = −4 … 4 by weighted MSE Σw(x − l/iscale)², then
    refines by coordinate descent; returns d = Σwxl / Σwl² and the ``uint8_t`` levels.
    """
    mx = np.maximum(first_max(x), _ZERO)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, _ONE, mx)
    iscale = rdiv(nmax, mx)
    start = nearest_int(iscale * x) & 0xFF  # C stores it in uint8_t L[] unclamped
    diff = x - (_ONE / iscale) * start.astype(np.float32)
    best_mse = seq_sum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = rdiv(f32(f32(f32(0.1) * step) + nmax), mx)
        lv = np.minimum(nearest_int(iscale_is * x), nmax).astype(np.float32)
        diff = x - (_ONE / iscale_is) * lv
        mse = seq_sum(w * diff * diff)
        take = mse < best_mse
        best_mse = np.where(take, mse, best_mse)
        iscale = np.where(take, iscale_is, iscale)
    lv = np.minimum(nearest_int(iscale * x), nmax)
    sums = _ls(w * x, w, lv.astype(np.float32))  # C sums with the int l, then stores l in uint8_t
    levels, sumlx, suml2 = _refine(x, w, lv & 0xFF, sums, lo=None, hi=nmax, wrap=True, need_sl2=True)
    pos = suml2 > 0
    scale = np.where(pos, sumlx / np.where(pos, suml2, _ONE), _ZERO)
    levels = np.where(zero, 0, levels)
    return np.where(zero, _ZERO, scale), levels


def _weighted_err(
    x: np.ndarray, w: np.ndarray, scale: np.ndarray, vmin: np.ndarray, lf: np.ndarray, use_mad: bool
) -> np.ndarray:
    """Σ w·|d·l + min − x| (``use_mad``) or Σ w·(d·l + min − x)², summed as C does."""
    diff = scale * lf
    diff += vmin
    diff -= x
    if use_mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff
    diff *= w
    return seq_sum(diff)


def _qkx_levels(x: np.ndarray, iscale: np.ndarray, vmin: np.ndarray, nmax: int) -> np.ndarray:
    """``MAX(0, MIN(nmax, nearest_int(iscale·(x − min))))``."""
    return np.clip(nearest_int((x - vmin) * iscale), 0, nmax)


def _qkx_levels_f(x: np.ndarray, iscale: np.ndarray, vmin: np.ndarray, nmax: int,
                  lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """:func:`_qkx_levels` as float32. Where every |iscale·(x − min)| < 2²² (bounded exactly from
    the block's extremes ``lo``/``hi``: float rounding is monotone) ``nearest_int`` is ``rint``
    (round half to even), one pass instead of the bit trick's four."""
    bound = np.maximum(np.abs((lo - vmin) * iscale), np.abs((hi - vmin) * iscale))
    if not bool((bound < _RINT_SAFE).all()):
        return _qkx_levels(x, iscale, vmin, nmax).astype(np.float32)
    v = np.subtract(x, vmin)
    v *= iscale
    np.rint(v, out=v)
    return np.clip(v, _ZERO, np.float32(nmax), out=v)


def make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, *, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (identical for given weights): x ≈ d·l − m.

    With min = min(0, min x), candidates iscale = (rmin + rdelta·is + nmax)/(max − min) for
    is = 0 … nstep give levels l = round(iscale·(x − min)); each gets the weighted least-squares
    (d, min) (min clamped to ≤ 0) and replaces the best if its weighted error is smaller; as in
    C, later candidates are then taken relative to the new min. Returns (d, m = −min, levels).
    """
    vmin = first_min(x)
    vmax = first_max(x)
    xlo = vmin
    sum_w = seq_sum(w[1:], start=w[0])
    wx = w * x
    sum_x = seq_sum(wx[1:], start=wx[0])
    vmin = np.where(vmin > 0, _ZERO, vmin)
    flat = vmax <= vmin  # C tests == (qkx2) or <= (qkx3): the same once min ≤ max
    span = np.where(flat, _ONE, vmax - vmin)
    iscale = rdiv(nmax, span)
    scale = _ONE / iscale
    lf0 = _qkx_levels(x, iscale, vmin, nmax).astype(np.float32)
    best_err = _weighted_err(x, w, scale, vmin, lf0, use_mad)
    # the winning candidate is (its iscale, the min its levels were taken from)
    best_is, best_from = iscale, vmin
    best_min = vmin
    for step in range(nstep + 1 if nstep >= 1 else 0):
        # C reuses ``min`` for the next candidates once a candidate has replaced it.
        cur_min = best_min
        span = np.where(flat, _ONE, vmax - cur_min)
        cand_is = rdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), span)
        lf = _qkx_levels_f(x, cand_is, cur_min, nmax, xlo, vmax)
        wl = w * lf
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * lf)
        wl *= x
        sum_xl = seq_sum(wl)
        det = sum_w * sum_l2 - sum_l * sum_l
        dpos = det > 0
        safe_det = np.where(dpos, det, _ONE)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        pos = this_min > 0
        if pos.any():
            this_min = np.where(pos, _ZERO, this_min)
            this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, _ONE), this_scale)
        err = _weighted_err(x, w, this_scale, this_min, lf, use_mad)
        take = dpos & (err < best_err)
        if take.any():
            best_err = np.where(take, err, best_err)
            best_is = np.where(take, cand_is, best_is)
            best_from = np.where(take, cur_min, best_from)
            scale = np.where(take, this_scale, scale)
            best_min = np.where(take, this_min, best_min)
    best_l = np.where(flat, 0, _qkx_levels(x, best_is, best_from, nmax))
    return np.where(flat, _ZERO, scale), -np.where(flat, vmin, best_min), best_l
