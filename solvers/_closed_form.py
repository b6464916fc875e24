"""Continuous relaxations, rounded and repaired: BAQ's closed form and a cvxpy LP.

``closed_form`` (BAQ, arXiv 2506.05664; methods.md "Closed form"). Each item ``i`` (``n_i``
weights) gets the convex model ``cost_i(b) = c_i · 2^(−2b)`` in its bits per weight
``b = size / n_i`` (overheads included, so the model lives in the budget's units). ``c_i`` is the
least-squares fit in log space with the slope fixed at −2·ln 2 over the item's points with
``cost > 0`` (``fp16``-like zero-cost points carry no information about ``c_i``):

    ln c_i = mean_j (ln cost_ij + 2·ln 2 · b_ij)

Minimising Σ c_i 2^(−2 b_i) subject to Σ n_i b_i = B gives equal marginal loss per bit; with
``w_i = c_i / n_i`` (loss per weight) and ``W`` their n-weighted geometric mean,

    b_i = B/N + ½·log2(w_i / W)          (reverse water-filling)

With box constraints ``b_i ∈ [b_min_i, b_max_i]`` (the item's smallest and largest option) the
solution is ``b_i(θ) = clip(½·log2 w_i − θ, b_min_i, b_max_i)`` with θ found by bisection so that
Σ n_i b_i(θ) = B. Each ``b_i`` is rounded to the nearest allowed option, then
:func:`solvers._greedy.repair` restores feasibility (least Δcost/Δsize first) and spends what is
left, all on the table's real (size, cost) points. The continuous optimum of the *fitted model* is
reported in ``stats["reference_cost_heuristic"]``: a heuristic reference, not a bound.

``cvxpy``: the convex relaxation of the real points, for any convex separable cost. Each item's
option is a convex combination ``λ_ij ≥ 0, Σ_j λ_ij = 1``; the relaxed cost at a given size is
then the item's piecewise-linear lower convex hull (the epigraph of the hull, written through its
vertices), and resource caps stay linear. The LP optimum is a lower bound (reported less the LP
solver's assumed accuracy); each item takes its heaviest option, then the same repair runs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from allocator.core.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._greedy import repair
from solvers._problem import Problem
from solvers._tolerances import ZERO_CAP

__all__ = ["ClosedFormSolver", "CvxpySolver", "b_of_theta", "fit_c", "water_fill"]

_LN2 = math.log(2.0)
#: Accuracy assumed of the LP value, relative to it and to the largest cost (interior-point
#: tolerances are ~1e-8).
_LP_RTOL = 1e-6


def item_params(problem: Problem) -> np.ndarray:
    """n_i: weights of every item (a tie group's members summed)."""
    return np.bincount(problem.item_of_unit, weights=problem.table.unit_params,
                       minlength=problem.n_items)


def fit_c(b: np.ndarray, cost: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """c_i of ``cost_i(b) = c_i·2^(−2b)``: ln c_i = mean_j(ln cost_ij + 2 ln2·b_ij) over cost > 0.

    Returns ``(c, rmse)`` with the root-mean-square residual of ``ln cost`` over the fitted
    points; ``c_i = 0`` for an item without a positive-cost point.
    """
    pts = valid & np.isfinite(cost) & (cost > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(pts, np.log(np.where(pts, cost, 1.0)) + 2.0 * _LN2 * b, 0.0)
    count = pts.sum(axis=1)
    log_c = y.sum(axis=1) / np.maximum(count, 1)
    c = np.where(count > 0, np.exp(log_c), 0.0)
    resid = np.where(pts, y - log_c[:, None], 0.0)
    rmse = float(np.sqrt((resid**2).sum() / max(int(count.sum()), 1)))
    return c, rmse


def b_of_theta(theta: float, half_log_w: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """b_i(θ) = clip(½·log2 w_i − θ, b_min_i, b_max_i) (``w_i = 0`` gives ``b_min_i``)."""
    return np.clip(half_log_w - theta, lo, hi)


def water_fill(B: float, n: np.ndarray, w: np.ndarray, lo: np.ndarray,
               hi: np.ndarray) -> tuple[np.ndarray, float]:
    """Continuous optimum of Σ n_i w_i 2^(−2 b_i) s.t. Σ n_i b_i = B, b ∈ [lo, hi].

    Unclamped it is ``b_i = B/N + ½·log2(w_i / W)`` (W = n-weighted geometric mean of w); with
    the box, θ of :func:`b_of_theta` is bisected until Σ n_i b_i(θ) = B. Returns ``(b, θ)``.
    """
    with np.errstate(divide="ignore"):
        half_log_w = 0.5 * np.log2(w)  # −inf where w = 0: that item stays at lo
    if float(n @ hi) <= B:
        return hi.copy(), -math.inf
    finite = np.isfinite(half_log_w)
    if not finite.any():
        return lo.copy(), math.inf
    t_lo = float((half_log_w[finite] - hi[finite]).min())  # every b_i at its top
    t_hi = float((half_log_w[finite] - lo[finite]).max())  # every b_i at its bottom
    for _ in range(200):  # Σ n b(θ) is non-increasing in θ; 200 halvings reach float precision
        mid = 0.5 * (t_lo + t_hi)
        if float(n @ b_of_theta(mid, half_log_w, lo, hi)) > B:
            t_lo = mid
        else:
            t_hi = mid
        if t_hi - t_lo <= 1e-13 * max(1.0, abs(t_hi)):
            break
    return b_of_theta(t_hi, half_log_w, lo, hi), t_hi


class ClosedFormSolver(BaseSolver):
    """BAQ's closed-form allocation, rounded and repaired (see the module docstring).

    A heuristic: ``feasible``, no bound.

    Example:
        >>> from allocator import Budget, CostTable
        >>> t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
        ...     options=["int2-g128-asym", "int4-g128-asym"], cost=[[4.0, 1.0], [9.0, 1.0]])
        >>> ClosedFormSolver().solve(t, Budget(bpw=3.25)).plan.choice
        {'a': 'int2-g128-asym', 'b': 'int4-g128-asym'}
    """

    name = "closed_form"
    capabilities = SolverCapabilities(exact=False, multi_resource=False)

    def params(self) -> dict[str, Any]:
        return {}

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        n = item_params(problem)
        b = np.where(problem.valid, problem.size, np.nan) / n[:, None]
        lo, hi = np.nanmin(b, axis=1), np.nanmax(b, axis=1)
        c, rmse = fit_c(np.nan_to_num(b), problem.cost, problem.valid)
        b_star, theta = water_fill(problem.cap, n, c / n, lo, hi)
        dist = np.where(problem.valid, np.abs(np.nan_to_num(b, nan=np.inf) - b_star[:, None]),
                        np.inf)
        rounded = np.argmin(dist, axis=1).astype(np.int64)  # nearest option (first slot on ties)
        choice = repair(problem, rounded)
        if choice is None:  # one size constraint: shrinking always reaches the smallest options
            return RawSolution(status=SolveStatus.ERROR, message="repair found no feasible plan")
        moved = int(np.count_nonzero(choice != rounded))
        stats = {"reference_cost_heuristic": float(np.sum(c * np.exp2(-2.0 * b_star))),
                 "fit_log_rmse": rmse, "theta": float(theta),
                 "continuous_bpw": float(n @ b_star / n.sum()), "repair_moves": float(moved)}
        return RawSolution(status=SolveStatus.FEASIBLE, choice=choice, stats=stats,
                           message="closed form (BAQ model), rounded and repaired; not certified")


#: cvxpy problem status → ours (``None``: solved, round and repair). Unknown → ERROR.
STATUS_MAP: dict[str, SolveStatus | None] = {
    "optimal": None,
    "optimal_inaccurate": None,
    "infeasible": SolveStatus.INFEASIBLE,
    "infeasible_inaccurate": SolveStatus.INFEASIBLE,
    "unbounded": SolveStatus.ERROR,
    "unbounded_inaccurate": SolveStatus.ERROR,
    "user_limit": SolveStatus.TIME_LIMIT,
    "solver_error": SolveStatus.ERROR,
}


class CvxpySolver(BaseSolver):
    """Convex (LP) relaxation with cvxpy, rounded and repaired (see the module docstring).

    A heuristic: ``feasible`` with the LP bound (less its assumed accuracy) and the gap.
    """

    name = "cvxpy"
    capabilities = SolverCapabilities(exact=False, multi_resource=True)
    REQUIRED_MODULES = ("cvxpy",)
    INSTALL_HINT = "pip install cvxpy (or 'bitalloc[solvers]')"

    def __init__(self, *, lp_solver: str | None = None) -> None:
        self._lp_solver = lp_solver

    def params(self) -> dict[str, Any]:
        return {"lp_solver": self._lp_solver}

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        lp = _relaxation(problem, self._lp_solver)
        if isinstance(lp, SolveStatus):
            return RawSolution(status=lp, message=f"LP relaxation: {lp}")
        weights, lp_value, scale, used = lp
        rounded = np.argmax(np.where(problem.valid, weights, -1.0), axis=1).astype(np.int64)
        choice = repair(problem, rounded)
        stats = {"lp_bound": lp_value}
        if choice is None:
            return RawSolution(status=SolveStatus.ERROR, bound=lp_value, stats=stats,
                               message="rounding and repair found no plan within every cap")
        # an interior-point LP value is accurate to its tolerance only: deflate it so the bound
        # stays a bound; the status never claims optimality on that evidence
        # (relative, plus absolute on the normalised objective); costs ≥ 0 make 0 a bound too
        bound = max(0.0, lp_value - _LP_RTOL * (abs(lp_value) + scale))
        return RawSolution(status=SolveStatus.FEASIBLE, choice=choice, bound=bound, stats=stats,
                           message=f"LP relaxation ({used}), rounded and repaired")


def _relaxation(problem: Problem, lp_solver: str | None
                ) -> tuple[np.ndarray, float, float, str] | SolveStatus:
    """The LP over convex-combination weights: (weights, LP value, cost scale, LP solver) or a
    status."""
    import cvxpy as cp
    import scipy.sparse as sp

    item, slot = np.nonzero(problem.valid)
    m = len(item)
    x = cp.Variable(m, nonneg=True)
    cost = problem.cost[item, slot]
    scale = float(max(np.abs(cost).max(initial=0.0), 1e-300))
    one = sp.csr_matrix((np.ones(m), (item, np.arange(m))), shape=(problem.n_items, m))
    rows = [(problem.size, problem.cap), *((problem.resources[k], problem.caps[k])
                                           for k in sorted(problem.caps))]
    cons = [one @ x == 1]
    for mat, cap in rows:
        coef = mat[item, slot]
        cons.append((coef / cap) @ x <= 1 if cap > ZERO_CAP else coef @ x <= 0)
    prob = cp.Problem(cp.Minimize((cost / scale) @ x), cons)
    # Clarabel (interior point) first: HiGHS' simplex needs ~20x longer on 1e4 GUB rows
    solver = lp_solver or next((s for s in ("CLARABEL", "HIGHS") if s in cp.installed_solvers()),
                               None)
    try:
        prob.solve(solver=solver)
    except cp.error.SolverError as exc:
        raise RuntimeError(f"cvxpy solver {solver} failed: {exc}") from None
    mapped = STATUS_MAP.get(str(prob.status), SolveStatus.ERROR)
    if mapped is not None:
        return mapped
    weights = np.zeros(problem.valid.shape)
    weights[item, slot] = np.asarray(x.value, dtype=np.float64)
    return weights, float(prob.value) * scale, scale, str(solver or "default")
