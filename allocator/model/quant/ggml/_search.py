"""ggml's scale searches (ggml-quants.c), vectorised over blocks, in C's float32 operation order.

Every function takes blocks ``x`` of shape ``[N, n]`` (and weights of the same shape) and runs
C's per-block loop for all ``N`` blocks at once; the loops that remain are over the ``n``
elements of a block or over C's candidate scales, never over blocks. Levels are returned as int32
tensors holding the values C stores in its ``L`` arrays (offsets, and the ``uint8_t`` wrap of
``make_qp_quants``, included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    import torch

__all__ = ["make_q3_quants", "make_qkx_quants", "make_qp_quants", "make_qx_quants"]


def _ls(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·x·l and Σ w·l·l, summed as C does (``sumlx += w*x[i]*l; suml2 += w*l*l``)."""
    lf = levels.float()
    return seq_sum(w * x * lf), seq_sum(w * lf * lf)


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w)``: symmetric scale d and levels L + nmax.

    Starting from iscale = −nmax / max (max = the signed element of largest |x|), it tries
    iscale = −(nmax + 0.1·is) / max for is = −9 … 9 and keeps the scale d = Σwxl / Σwl² of the
    candidate maximising (Σwxl)² / Σwl² (the weighted least-squares fit of x ≈ d·l).
    """
    import torch

    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx).unsqueeze(-1)

    def levels(c: float) -> torch.Tensor:
        return nearest_int(rdiv(c, mx) * x).clamp(-nmax, nmax - 1)

    best_l = levels(f32(-nmax))
    sumlx, suml2 = _ls(x, w, best_l)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand = levels(f32(-(f32(nmax) + f32(f32(0.1) * step))))
        slx, sl2 = _ls(x, w, cand)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        best_l = torch.where(take.unsqueeze(-1), cand, best_l)
        scale = torch.where(take, slx / sl2, scale)
        best = torch.where(take, scale * slx, best)
    best_l = torch.where(zero.unsqueeze(-1), torch.zeros_like(best_l), best_l + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), best_l


def _refine(
    x: torch.Tensor,
    w: torch.Tensor,
    levels: torch.Tensor,
    sums: tuple[torch.Tensor, torch.Tensor],
    *,
    lo: int | None,
    hi: int,
    wrap: bool,
    need_sl2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C's coordinate descent of ``make_q3_quants``/``make_qp_quants`` (5 sweeps over i).

    Each element in turn moves to l' = nearest_int(x·Σ'wl² / Σ'wxl) (Σ' = the sums without it)
    if that raises (Σwxl)²/Σwl². A sweep that changes no block changes nothing after it either,
    so stopping there equals C's per-block ``break``.
    """
    import torch

    sumlx, suml2 = sums
    levels = levels.clone()
    for _ in range(5):
        changed_any = torch.zeros((), dtype=torch.bool)
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i], w[..., i], levels[..., i]
            lf = li.float()
            slx = sumlx - wi * xi * lf
            sl2 = suml2 - wi * lf * lf
            ok = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            new = nearest_int(xi * sl2 / slx)
            new = new.clamp(lo, hi) if lo is not None else new.clamp(max=hi)
            nf = new.float()
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            better = slx2 * slx2 * suml2 > sumlx * sumlx * sl22
            if not need_sl2:
                better = better & (sl22 > 0)
            accept = ok & (new != li) & better
            levels[..., i] = torch.where(accept, new & 0xFF if wrap else new, li)
            sumlx = torch.where(accept, slx2, sumlx)
            suml2 = torch.where(accept, sl22, suml2)
            changed_any = changed_any | accept.any()
        if not bool(changed_any):
            break
    return levels, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: RTN at −nmax/max, then weighted (w = x²)
    coordinate descent; returns d = Σwxl / Σwl² and levels L + nmax (0 for an all-zero block)."""
    import torch

    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx).unsqueeze(-1)
    levels = nearest_int(rdiv(f32(-nmax), mx) * x).clamp(-nmax, nmax - 1)
    w = x * x
    levels, sumlx, suml2 = _refine(
        x, w, levels, _ls(x, w, levels), lo=-nmax, hi=nmax - 1, wrap=False, need_sl2=False
    )
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    levels = torch.where(zero.unsqueeze(-1), torch.zeros_like(levels), levels + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights=w)``: a positive scale for non-negative x.

    Tries iscale = (nmax + 0.1·is)/max for is = −4 … 4 by weighted MSE Σw(x − l/iscale)², then
    refines by coordinate descent; returns d = Σwxl / Σwl² and the ``uint8_t`` levels.
    """
    import torch

    mx = first_max(x).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx).unsqueeze(-1)
    iscale = rdiv(f32(nmax), mx)
    start = nearest_int(iscale * x) & 0xFF  # C stores it in uint8_t L[] unclamped
    diff = x - (1 / iscale) * start.float()
    best_mse = seq_sum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = rdiv(f32(f32(f32(0.1) * step) + nmax), mx)
        lv = nearest_int(iscale_is * x).clamp(max=nmax).float()
        diff = x - (1 / iscale_is) * lv
        mse = seq_sum(w * diff * diff)
        take = mse < best_mse
        best_mse = torch.where(take, mse, best_mse)
        iscale = torch.where(take.unsqueeze(-1), iscale_is, iscale)
    lv = nearest_int(iscale * x).clamp(max=nmax)
    sums = _ls(x, w, lv)  # C sums with the int l, then stores l in uint8_t
    levels, sumlx, suml2 = _refine(x, w, lv & 0xFF, sums, lo=None, hi=nmax, wrap=True, need_sl2=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    levels = torch.where(zero.unsqueeze(-1), torch.zeros_like(levels), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


def _weighted_err(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    vmin: torch.Tensor,
    levels: torch.Tensor,
    use_mad: bool,
) -> torch.Tensor:
    """Σ w·|d·l + min − x| (``use_mad``) or Σ w·(d·l + min − x)², summed as C does."""
    diff = scale * levels.float() + vmin - x
    diff = diff.abs() if use_mad else diff * diff
    return seq_sum(w * diff)


def make_qkx_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, *, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (identical for given weights): x ≈ d·l − m.

    With min = min(0, min x), candidates iscale = (rmin + rdelta·is + nmax)/(max − min) for
    is = 0 … nstep give levels l = round(iscale·(x − min)); each gets the weighted least-squares
    (d, min) (min clamped to ≤ 0) and replaces the best if its weighted error is smaller; as in
    C, later candidates are then taken relative to the new min. Returns (d, m = −min, levels).
    """
    import torch

    vmin = first_min(x)
    vmax = first_max(x)
    sum_w = seq_sum(w[..., 1:], start=w[..., 0])
    sum_x = seq_sum(w[..., 1:] * x[..., 1:], start=w[..., 0] * x[..., 0])
    vmin = torch.where(vmin > 0, torch.zeros_like(vmin), vmin)
    flat = vmax <= vmin  # C tests == (qkx2) or <= (qkx3): the same once min ≤ max
    span = torch.where(flat, torch.ones_like(vmax), vmax - vmin).unsqueeze(-1)
    vmin_c = vmin.unsqueeze(-1)
    iscale = rdiv(f32(nmax), span)
    scale = 1 / iscale
    best_l = nearest_int(iscale * (x - vmin_c)).clamp(0, nmax)
    best_err = _weighted_err(x, w, scale, vmin_c, best_l, use_mad)
    scale, best_min = scale.squeeze(-1), vmin
    for step in range(nstep + 1 if nstep >= 1 else 0):
        # C reuses ``min`` for the next candidates once a candidate has replaced it.
        cur_min = best_min.unsqueeze(-1)
        span = torch.where(flat.unsqueeze(-1), torch.ones_like(cur_min), vmax.unsqueeze(-1) - cur_min)
        cand_is = rdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), span)
        lv = nearest_int(cand_is * (x - cur_min)).clamp(0, nmax)
        lf = lv.float()
        sum_l, sum_l2, sum_xl = seq_sum(w * lf), seq_sum(w * lf * lf), seq_sum(w * lf * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        err = _weighted_err(x, w, this_scale.unsqueeze(-1), this_min.unsqueeze(-1), lv, use_mad)
        take = (det > 0) & (err < best_err)
        best_l = torch.where(take.unsqueeze(-1), lv, best_l)
        best_err = torch.where(take, err, best_err)
        scale = torch.where(take, this_scale, scale)
        best_min = torch.where(take, this_min, best_min)
    zeros = torch.zeros_like(scale)
    best_l = torch.where(flat.unsqueeze(-1), torch.zeros_like(best_l), best_l)
    return torch.where(flat, zeros, scale), -torch.where(flat, vmin, best_min), best_l
