"""HAWQ's top-eigenvalue score (``hessian-eig``): power iteration on task-loss Hessian blocks.

The Hessian-vector products and their first-order graphs come from :mod:`sensitivity._hessian`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors, score_times_error
from sensitivity._hessian import check_int, check_tol, graphs
from sensitivity._loss import gradient_mode, unit_block, unit_leaves
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

__all__ = ["HessianEigEstimator", "power_iteration"]


def power_iteration(
    model: torch.nn.Module, ctx: EstimateContext, *, max_iter: int = 20, tol: float = 1e-3,
    cache_graphs: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Dominant eigenvalue λ_i of every unit block H_i, and the iterations used (HAWQ).

    ``v ← H_i v / ‖H_i v‖`` from a seeded Gaussian start; ``λ = vᵀ H_i v`` with ‖v‖ = 1; a unit
    stops when ``|λ_t − λ_{t−1}| / (|λ_{t−1}| + 1e-6) < tol`` (PyHessian) or after ``max_iter``.
    Each unit needs its own products (a shared probe would mix in the cross blocks H_ij).
    """
    import torch

    leaves, index = unit_leaves(model, ctx.units)
    gen = torch.Generator().manual_seed(ctx.seed)
    vecs: list[torch.Tensor] = []
    for u, k in zip(ctx.units, index, strict=True):
        v = torch.randn(tuple(unit_block(leaves[k].detach(), u).shape), generator=gen)
        vecs.append((v / v.norm()).to(leaves[k].device, leaves[k].dtype))
    lam = np.zeros(len(ctx.units))
    iters = np.zeros(len(ctx.units), dtype=np.int64)
    active = list(range(len(ctx.units)))
    cached: list[tuple[list[torch.Tensor | None], int]] = []
    with gradient_mode(model, leaves), progress_bar(max_iter, "hessian-eig iterations",
                                                     ctx.progress) as bar:
        for _ in range(max_iter):
            hv = [torch.zeros_like(vecs[i]) for i in active]
            total = 0
            for grads, n in graphs(model, ctx, leaves, cached, cache_graphs):
                total += n
                for a, i in enumerate(active):
                    hv[a] += n * _block_hvp(grads, leaves, ctx.units[i], index[i], vecs[i])
            if total == 0:
                raise InvalidParameterError("no calibration sample has a target; use longer texts")
            still = []
            for a, i in enumerate(active):
                h = hv[a] / total
                new = float((vecs[i] * h).sum())
                iters[i] += 1
                norm = float(h.norm())
                if norm > 0:
                    vecs[i] = h / norm
                done = iters[i] > 1 and abs(new - lam[i]) / (abs(lam[i]) + 1e-6) < tol
                lam[i] = new
                if not done and norm > 0:
                    still.append(i)
            active = still
            bar.update(1)
            if not active:
                break
    return lam, iters


def _block_hvp(grads: Sequence[torch.Tensor | None], leaves: Sequence[torch.Tensor], unit: Any,
               k: int, v: torch.Tensor) -> torch.Tensor:
    """``H_i v`` for one unit: probe zero outside the unit's block, result cut to the block."""
    import torch

    g = grads[k]
    if g is None:
        return torch.zeros_like(v)
    full = torch.zeros_like(leaves[k])
    unit_block(full, unit).copy_(v)
    (res,) = torch.autograd.grad([g], [leaves[k]], grad_outputs=[full], retain_graph=True,
                                 allow_unused=True)
    return torch.zeros_like(v) if res is None else unit_block(res.detach(), unit).clone()



class HessianEigEstimator(BaseEstimator):
    """HAWQ (arXiv 1905.03696): cost(i, b) = |λ_i|/n_i · ‖Q_b(W_i) − W_i‖².

    λ_i is the dominant eigenvalue of H_i by power iteration on Hessian-vector products
    (:func:`power_iteration`); HAWQ orders blocks by λ_i/n_i.

    Args:
        max_iter: power iterations per unit (HAWQ: ~20).
        tol: relative change of λ that stops a unit early.
        cache_graphs: keep every batch's first-order graph across iterations (default: the
            graphs are reused by all units × iterations, so rebuilding them would dominate).
    """

    name: ClassVar[str] = "hessian-eig"

    def __init__(self, *, max_iter: int = 20, tol: float = 1e-3, cache_graphs: bool = True) -> None:
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.tol = check_tol(tol)
        self.cache_graphs = bool(cache_graphs)

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        lam, iters = power_iteration(model, ctx, max_iter=self.max_iter, tol=self.tol,
                                     cache_graphs=self.cache_graphs)
        n = np.asarray([u.params for u in ctx.units], dtype=np.float64)
        cost = score_times_error(np.abs(lam) / n, quant_errors(model, ctx.units, ctx.options, ctx.quantizer))
        return UnitCosts(cost=cost, info={"eigenvalue": lam.tolist(), "iterations": iters.tolist()})

