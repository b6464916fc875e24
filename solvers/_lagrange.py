"""MCKP with extra resource caps: Lagrangian bound, feasible repair, branch-and-bound on the core.

With caps ``Σ w_k ≤ b_k`` (size and every capped resource column), every multiplier vector
``μ ≥ 0`` gives the bound ``L(μ) = Σ_i min_j (c_ij + Σ_k μ_k w_kij) − Σ_k μ_k b_k``
(:func:`solvers._hull.lagrangian_value`); coordinate ascent maximises it, one multiplier at a
time by bisection on its subgradient ``Σ_i w_k[i, j*(μ)] − b_k``. Reduced costs against ``μ``
fix items exactly as in the single-cap case, and a depth-first branch-and-bound enumerates the
core. When limits stop it, the problem goes to the ``ilp`` solver if installed (and allowed);
otherwise the best plan is returned as ``feasible`` with the certified gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from allocator.core.result import SolveStatus
from solvers._base import RawSolution
from solvers._hull import lagrangian_value
from solvers._problem import Problem
from solvers._registry import SOLVERS, solver_class
from solvers._tolerances import CAP_RTOL, OBJECTIVE_RTOL, ZERO_CAP

if TYPE_CHECKING:
    from solvers._mckp import MckpConfig

_SEARCH_SHARE = 0.1  # as in solvers._mckp
_MU_MAX = 1e100  # multipliers stay far from overflow of μ·w
_MU_MIN = 1e-300  # below it a multiplier is 0 for every cost a table holds

__all__ = ["optimise_multipliers", "repair", "solve_multi"]


def _weights(problem: Problem) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """(cost, weights, caps); a zero cap's resource is forbidden outright (:func:`within_cap`)."""
    names = sorted(problem.caps)
    weights = [problem.size, *(problem.resources[k] for k in names)]
    caps = [problem.cap, *(problem.caps[k] for k in names)]
    cost = problem.cost
    for w, b in zip(weights, caps, strict=True):
        if b <= ZERO_CAP:
            cost = np.where(w > 0, np.inf, cost)
    return cost, weights, [b if b > ZERO_CAP else 0.0 for b in caps]


def optimise_multipliers(cost: np.ndarray, weights: list[np.ndarray], caps: list[float],
                         *, sweeps: int = 8, steps: int = 50) -> tuple[list[float], float]:
    """Coordinate ascent on the concave dual ``L(μ)``; returns (μ, L(μ))."""
    mult = [0.0] * len(weights)
    best, _ = lagrangian_value(cost, weights, mult, caps)
    rows = np.arange(cost.shape[0])
    for _ in range(sweeps):
        before = best
        for k, (w, b) in enumerate(zip(weights, caps, strict=True)):
            others = [m if j != k else 0.0 for j, m in enumerate(mult)]
            _, base = lagrangian_value(cost, weights, others, caps)

            def grad(t: float, base: np.ndarray = base, w: np.ndarray = w, b: float = b) -> float:
                j = np.argmin(base + t * w if t > 0 else base, axis=1)  # 0·inf is nan
                return float(w[rows, j].sum()) - b * (1 + 1e-9)  # the plan check's slack

            if grad(0.0) <= 0:
                mult[k] = 0.0
            else:
                hi = min(max(_finite_max(base) / _least_positive(w), _MU_MIN), _MU_MAX)
                while grad(hi) > 0 and hi < _MU_MAX:
                    hi *= 4.0
                mult[k] = _bisect_log(grad, hi, steps)
            value, _ = lagrangian_value(cost, weights, mult, caps)
            best = max(best, value)
        if best - before <= OBJECTIVE_RTOL * max(1.0, abs(best)):
            break
    value, _ = lagrangian_value(cost, weights, mult, caps)
    return mult, value


def _bisect_log(grad: Callable[[float], float], hi: float, steps: int) -> float:
    """The least ``μ`` in ``(0, hi]`` with ``grad(μ) ≤ 0`` (``grad(hi) ≤ 0``), within ~1e-12.

    The bracket starts at ``hi = max|c| / min w``, which a single resource value of 1e-300 puts
    hundreds of decades above the breakpoint (a ratio ``Δc/Δw`` of the table); halving it
    arithmetically 50 times would stop 15 decades short, with a bound ``−μ·b`` that drowns
    every cost in round-off. Halving the exponent reaches the breakpoint's decade in ~10 steps.
    """
    lo = _MU_MIN
    if grad(lo) <= 0:
        return lo
    for _ in range(steps):
        geometric = hi > 4.0 * lo
        mid = float(np.sqrt(lo) * np.sqrt(hi)) if geometric else 0.5 * (lo + hi)
        lo, hi = (mid, hi) if grad(mid) > 0 else (lo, mid)
        if not geometric and hi - lo <= 1e-12 * hi:
            break
    return hi


def _finite_max(x: np.ndarray) -> float:
    """1 + the largest finite |value| (a cost scale)."""
    return 1.0 + float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))


def _least_positive(w: np.ndarray) -> float:
    """The smallest positive finite weight (1 when there is none)."""
    pos = w[np.isfinite(w) & (w > 0)]
    return float(pos.min()) if pos.size else 1.0


def repair(cost: np.ndarray, weights: list[np.ndarray], caps: list[float],
           mult: list[float]) -> np.ndarray | None:
    """A plan within every cap: the Lagrangian choice with the violated multipliers raised.

    Raising μ_k makes the argmin lighter in resource k; each violated multiplier is doubled
    (from a scale where it matters) until the choice fits, then single-item moves that lower
    the cost and keep every cap are applied greedily.
    """
    m = list(mult)
    rows = np.arange(cost.shape[0])
    scale = [_finite_max(cost) / _least_positive(w) for w in weights]
    choice = None
    for _ in range(200):
        _, pen = lagrangian_value(cost, weights, m, caps)
        cand = np.argmin(pen, axis=1)
        used = [float(w[rows, cand].sum()) for w in weights]
        over = [u > b * (1 + CAP_RTOL) for u, b in zip(used, caps, strict=True)]
        if not any(over):
            choice = cand
            break
        m = [min(max(2 * mk, 1e-6 * sk), _MU_MAX) if o else mk
             for mk, sk, o in zip(m, scale, over, strict=True)]
    if choice is None:
        return None
    return _improve(cost, weights, caps, choice)


def _improve(cost: np.ndarray, weights: list[np.ndarray], caps: list[float],
             choice: np.ndarray) -> np.ndarray:
    """Apply the best cost-lowering single-item move that keeps every cap, repeatedly."""
    rows = np.arange(cost.shape[0])
    choice = choice.copy()
    for _ in range(10_000):
        slack = [b * (1 + CAP_RTOL) - float(w[rows, choice].sum()) for w, b in zip(weights, caps,
                                                                                strict=True)]
        gain = cost[rows, choice][:, None] - cost
        ok = np.isfinite(cost) & (gain > 0)
        for w, sl in zip(weights, slack, strict=True):
            ok &= (w - w[rows, choice][:, None]) <= sl
        if not ok.any():
            break
        i, j = np.unravel_index(int(np.argmax(np.where(ok, gain, -np.inf))), cost.shape)
        choice[i] = j
    return choice


def solve_multi(problem: Problem, cfg: MckpConfig, deadline: float) -> RawSolution:
    """Exact MCKP with resource caps (see the module docstring)."""
    cost, weights, caps = _weights(problem)
    rows = np.arange(problem.n_items)
    mult, lb = optimise_multipliers(cost, weights, caps)
    _, pen = lagrangian_value(cost, weights, mult, caps)
    with np.errstate(invalid="ignore"):
        rc = np.nan_to_num(pen - pen.min(axis=1, keepdims=True), nan=np.inf)
    incumbent = repair(cost, weights, caps, mult)
    ub = float(cost[rows, incumbent].sum()) if incumbent is not None else np.inf
    tol = OBJECTIVE_RTOL * (float(np.abs(pen.min(axis=1)).sum()) + sum(m * b for m, b in zip(mult, caps,
                                                                                   strict=True)))
    eps = _SEARCH_SHARE * cfg.rel_gap * abs(ub) if np.isfinite(ub) else 0.0
    g = ub - eps - lb + tol
    stats: dict[str, float] = {"lagrangian_bound": lb,
                               **{f"mu_{i}": m for i, m in enumerate(mult)}}
    if incumbent is not None and g <= 0:
        return RawSolution(status=SolveStatus.OPTIMAL, choice=incumbent, stats=stats,
                           bound=max(lb, ub - eps), message="repair meets the Lagrangian bound")
    found, complete, nodes = _branch_and_bound(problem, weights, caps, mult, rc, g, cfg, deadline)
    stats["nodes"] = float(nodes)
    if found is not None and float(cost[rows, found].sum()) < ub:
        incumbent, ub = found, float(cost[rows, found].sum())
    if complete:
        if incumbent is None:
            return RawSolution(status=SolveStatus.INFEASIBLE, stats=stats,
                               message="no plan meets every cap together (proven by search)")
        return RawSolution(status=SolveStatus.OPTIMAL, choice=incumbent, stats=stats,
                           bound=max(lb, ub - _SEARCH_SHARE * cfg.rel_gap * abs(ub)),
                           message="certified by Lagrangian reduced-cost fixing and B&B")
    if cfg.handoff:
        handed = _handoff(problem, incumbent, ub, lb, stats)
        if handed is not None:
            return handed
    if incumbent is None:
        return RawSolution(status=SolveStatus.TIME_LIMIT, bound=lb, stats=stats,
                           message="limits reached before a plan meeting every cap was found")
    return RawSolution(status=SolveStatus.FEASIBLE, choice=incumbent, bound=lb, stats=stats,
                       message="limits reached; gap certified by the Lagrangian bound "
                       "(install the 'ilp' solver to hand such problems off)")


def _branch_and_bound(problem: Problem, weights: list[np.ndarray], caps: list[float],
                      mult: list[float], rc: np.ndarray, g: float, cfg: MckpConfig,
                      deadline: float) -> tuple[np.ndarray | None, bool, int]:
    """Depth-first search over items with an alternative of reduced cost below ``g``.

    A node with reduced sum ``R`` and usage ``u`` is cut when some cap cannot be met by the
    items left (each at its lightest kept slot) or when ``R + Σ_k μ_k·max(0, b_k − u_k −
    Σ_left max w_k) ≥ g`` (every plan costs ``L(μ) + Σ rc + Σ_k μ_k·slack_k``).
    """
    n, d = problem.n_items, len(weights)
    fixed = np.argmin(rc, axis=1)
    keep = rc < g
    alt = keep.sum(axis=1) > 1
    core = np.flatnonzero(alt)
    core = core[np.argsort(np.partition(np.where(keep[core], rc[core], np.inf), 1, axis=1)[:, 1]
                           if problem.n_slots > 1 else np.zeros(len(core)), kind="stable")]
    rows = np.arange(n)
    rest = ~alt
    used0 = [float(w[rows[rest], fixed[rest]].sum()) for w in weights]
    slot_lists = [np.flatnonzero(keep[i])[np.argsort(rc[i, keep[i]], kind="stable")] for i in core]
    wv = [[[float(w[i, j]) for w in weights] for j in js] for i, js in zip(core, slot_lists,
                                                                            strict=True)]
    rv = [[float(rc[i, j]) for j in js] for i, js in zip(core, slot_lists, strict=True)]
    m = len(core)
    lo = np.zeros((m + 1, d))
    hi = np.zeros((m + 1, d))
    for p in range(m - 1, -1, -1):
        arr = np.array(wv[p])
        lo[p], hi[p] = lo[p + 1] + arr.min(axis=0), hi[p + 1] + arr.max(axis=0)
    cap_tol = [b * (1 + CAP_RTOL) for b in caps]
    best_r, best_pick = g, None
    pick = [0] * m
    used, r_sum, nodes = list(used0), 0.0, 0
    if any(used[k] + lo[0][k] > cap_tol[k] for k in range(d)):
        return None, True, 0
    p, pos = 0, [-1] * (m + 1)
    while p >= 0:
        if p == m:  # a complete plan with reduced excess below the best so far
            excess = r_sum + sum(mu * max(0.0, b - u) for mu, b, u in zip(mult, caps, used,
                                                                         strict=True))
            if excess < best_r:
                best_r, best_pick = excess, list(pick)
            p -= 1
            continue
        if pos[p] >= 0:  # undo the previous choice at this depth
            j = pos[p]
            for k in range(d):
                used[k] -= wv[p][j][k]
            r_sum -= rv[p][j]
        pos[p] += 1
        if pos[p] >= len(slot_lists[p]) or r_sum + rv[p][pos[p]] >= best_r:
            pos[p] = -1  # slots are in rc order: none later can do better
            p -= 1
            continue
        nodes += 1
        if nodes > cfg.max_nodes or (nodes % 4096 == 0 and time.perf_counter() > deadline):
            return _pick(fixed, core, slot_lists, best_pick), False, nodes
        j = pos[p]
        r_sum += rv[p][j]
        for k in range(d):
            used[k] += wv[p][j][k]
        bound = r_sum
        feasible = True
        for k in range(d):
            if used[k] + lo[p + 1][k] > cap_tol[k]:
                feasible = False
                break
            bound += mult[k] * max(0.0, caps[k] - used[k] - hi[p + 1][k])
        if feasible and bound < best_r:
            pick[p] = j
            p += 1
            pos[p] = -1
    return _pick(fixed, core, slot_lists, best_pick), True, nodes


def _pick(fixed: np.ndarray, core: np.ndarray, slot_lists: list[np.ndarray],
          pick: list[int] | None) -> np.ndarray | None:
    if pick is None:
        return None
    choice = fixed.copy()
    for i, js, j in zip(core, slot_lists, pick, strict=True):
        choice[i] = int(js[j])
    return choice


def _handoff(problem: Problem, incumbent: np.ndarray | None, ub: float, lb: float,
             stats: dict[str, float]) -> RawSolution | None:
    """Solve with the ``ilp`` solver when it is installed; keep the better plan."""
    import importlib.util

    module = SOLVERS["ilp"].split(":")[0]
    if importlib.util.find_spec(module) is None:
        return None
    try:
        cls = solver_class("ilp")
    except (ImportError, AttributeError):
        return None
    if not cls.is_available():
        return None
    res = cls().solve(problem.table, problem.budget)
    if res.plan is None:
        return None
    slot_of = {str(lbl): j for j, lbl in enumerate(problem.labels)}
    choice = np.empty(problem.n_items, dtype=np.int64)
    by_unit = res.plan.choice
    for u, item in zip(problem.table.units, problem.item_of_unit, strict=True):
        choice[item] = slot_of[by_unit[u]]
    value = float(problem.cost[np.arange(problem.n_items), choice].sum())
    stats = {**stats, "handoff_ilp": 1.0}
    bound = max(lb, res.bound) if res.bound is not None else lb
    if incumbent is not None and ub < value:
        choice, value = incumbent, ub
    status = SolveStatus.OPTIMAL if res.status is SolveStatus.OPTIMAL else SolveStatus.FEASIBLE
    return RawSolution(status=status, choice=choice, bound=bound if status is not
                       SolveStatus.OPTIMAL else min(bound, value), stats=stats,
                       message=f"core search hit its limits; handed off to ilp ({res.status})")
