"""The exact default solver: multiple-choice knapsack by LP bound, reduced-cost fixing, core DP.

Single size cap (the usual case):

1. Lower convex hull of every item's (size, cost) points and the LP relaxation by a greedy on
   incremental efficiencies (:mod:`solvers._hull`); its dual ``λ`` gives the Lagrangian bound
   ``LB = L(λ) = Σ_i min_j (c_ij + λ s_ij) − λ·S``.
2. Reduced costs ``r_ij = c_ij + λ s_ij − min_j'(c_ij' + λ s_ij') ≥ 0``. Every feasible plan costs
   ``LB + Σ_i r_i,x_i + λ·(S − Σ s) ≥ LB + Σ_i r_i,x_i``, so a plan cheaper than the incumbent
   ``UB`` uses no slot with ``r_ij ≥ UB − LB``: those slots are eliminated, and an item left with
   one slot is fixed (Dembo & Hammer's reduction, as in Pisinger's minimal algorithm).
3. The few undecided items (the *core*) are solved exactly by a dynamic programme over Pareto
   (size, cost) states, pruned by the same bound. Rounds first run the DP on a prefix of the
   core to find a good incumbent, which shrinks ``UB − LB`` and with it the core, until the
   whole core is enumerated (certified optimal) or a limit stops it (feasible, with the gap).

Extra resource caps go to :mod:`solvers._lagrange` (several multipliers, repair, B&B).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._hull import lagrangian_value, lower_hulls, lp_greedy
from solvers._problem import Problem
from solvers._tolerances import CAP_RTOL, OBJECTIVE_RTOL

__all__ = ["MckpConfig", "MckpSolver", "pareto_core_dp"]

#: The search ignores improvements below this share of ``rel_gap·|UB|``, so a completed search
#: proves a gap of at most a tenth of the tolerance (rounding cannot push it over).
_SEARCH_SHARE = 0.1


@dataclass(frozen=True, kw_only=True)
class MckpConfig:
    """Limits of :class:`MckpSolver` (defaults certify optimality on any realistic table).

    Attributes:
        time_limit_s: wall-clock limit of the exact phase; past it the best plan is returned
            as ``feasible`` with its certified gap.
        rel_gap: relative gap at which a plan counts as optimal (improvements smaller than
            ``rel_gap·|UB|`` are not searched for).
        max_states: Pareto states kept per DP level; beyond it the DP keeps the best-bounded
            states and the round no longer certifies.
        max_nodes: branch-and-bound nodes for resource-capped problems.
        first_core: items in the first (incumbent-finding) DP round.
        handoff: with resource caps, hand an uncertified problem to the ``ilp`` solver when
            it is installed.
    """

    time_limit_s: float = 60.0
    rel_gap: float = 1e-9
    max_states: int = 200_000
    max_nodes: int = 2_000_000
    first_core: int = 256
    handoff: bool = True

    def __post_init__(self) -> None:
        for name in ("time_limit_s", "rel_gap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 \
                    or not np.isfinite(v):
                raise InvalidParameterError(
                    f"The {name!r} parameter of MckpConfig must be a float in the range (0, inf). "
                    f"Got {v!r} instead.")
        for name in ("max_states", "max_nodes", "first_core"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidParameterError(
                    f"The {name!r} parameter of MckpConfig must be an int ≥ 1. Got {v!r} instead.")


class MckpSolver(BaseSolver):
    """Exact multiple-choice knapsack (the default solver); see the module docstring.

    Example:
        >>> from allocator import Budget, CostTable
        >>> t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
        ...     options=["int2-g128-asym", "int4-g128-asym"], cost=[[4.0, 1.0], [9.0, 1.0]])
        >>> r = MckpSolver().solve(t, Budget(bpw=3.25))
        >>> r.status.value, r.objective
        ('optimal', 5.0)
    """

    name = "mckp"
    capabilities = SolverCapabilities(exact=True, multi_resource=True, frontier=True)

    def __init__(self, *, time_limit_s: float = 60.0, rel_gap: float = 1e-9,
                 max_states: int = 200_000, max_nodes: int = 2_000_000, first_core: int = 256,
                 handoff: bool = True) -> None:
        self._config = MckpConfig(time_limit_s=time_limit_s, rel_gap=rel_gap,
                                  max_states=max_states, max_nodes=max_nodes,
                                  first_core=first_core, handoff=handoff)

    @property
    def config(self) -> MckpConfig:
        return self._config

    def params(self) -> dict[str, Any]:
        return asdict(self._config)

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        deadline = time.perf_counter() + self._config.time_limit_s
        if problem.caps:
            from solvers._lagrange import solve_multi

            return solve_multi(problem, self._config, deadline)
        return _solve_single(problem, self._config, deadline)


def _solve_single(problem: Problem, cfg: MckpConfig, deadline: float) -> RawSolution:
    size, cost, cap = problem.size, problem.cost, problem.cap
    rows = np.arange(problem.n_items)
    hull = lower_hulls(size, cost)
    lp = lp_greedy(hull, size, cap)
    stats: dict[str, float] = {"hull_steps": float(hull.n_steps), "lambda": lp.lam}
    lb, pen = lagrangian_value(cost, [size], [lp.lam], [cap])
    choice = lp.choice.copy()
    ub = float(cost[rows, choice].sum())
    stats["lp_bound"] = lb
    if lp.n_taken == hull.n_steps:  # every item at its cheapest point: the budget does not bind
        return RawSolution(status=SolveStatus.OPTIMAL, choice=choice, bound=ub,
                           message="budget does not bind", stats=stats)
    rc = pen - pen.min(axis=1, keepdims=True)
    # Round-off of LB and of the reduced costs, relative to the magnitudes summed.
    tol = OBJECTIVE_RTOL * (float(np.abs(pen.min(axis=1)).sum()) + lp.lam * cap)
    alt = np.partition(rc, 1, axis=1)[:, 1] if problem.n_slots > 1 else np.full(len(rc), np.inf)
    fixed = np.argmin(rc, axis=1)
    certified, rounds, core_cap, states = False, 0, cfg.first_core, 0
    while time.perf_counter() < deadline:
        rounds += 1
        eps = _SEARCH_SHARE * cfg.rel_gap * abs(ub)
        g = ub - eps - lb + tol
        if g <= 0:
            certified = True
            break
        cand = np.flatnonzero(alt < g)
        cand = cand[np.argsort(alt[cand], kind="stable")]
        whole = len(cand) <= core_cap
        core = cand if whole else cand[:core_cap]
        # A partial core only seeks an incumbent: a narrow beam is enough.
        beam = cfg.max_states if whole else min(cfg.max_states, 256)
        found, exhaustive, n_states = pareto_core_dp(
            core, fixed, size, cost, rc, cap, g, lp.lam, beam, deadline)
        states = max(states, n_states)
        value = float(cost[rows, found].sum()) if found is not None else np.inf
        improved = found is not None and value < ub
        if found is not None and improved:
            choice, ub = found, value
        if whole and exhaustive:
            certified = True
            break
        if whole and not improved:
            break  # the full core overflowed the state limit and found nothing better
        if not whole:
            core_cap *= 4
    stats.update(rounds=float(rounds), core=float(np.count_nonzero(alt < ub - lb + tol)),
                 max_states=float(states))
    if certified:
        bound = max(lb, ub - _SEARCH_SHARE * cfg.rel_gap * abs(ub))
        return RawSolution(status=SolveStatus.OPTIMAL, choice=choice, bound=bound,
                           message="certified by reduced-cost fixing and core DP", stats=stats)
    why = "time limit" if time.perf_counter() >= deadline else "state limit"
    return RawSolution(status=SolveStatus.FEASIBLE, choice=choice, bound=lb,
                       message=f"{why} reached; gap certified by the LP bound", stats=stats)


def pareto_core_dp(core: np.ndarray, fixed: np.ndarray, size: np.ndarray, cost: np.ndarray,
                   rc: np.ndarray, cap: float, g: float, lam: float, max_states: int,
                   deadline: float) -> tuple[np.ndarray | None, bool, int]:
    """Best plan with items outside ``core`` at ``fixed`` (their rc = 0 slot), if it beats ``g``.

    States are Pareto-optimal (size, cost) partial plans over the core items processed so far.
    A plan costs ``LB + R + λ·slack`` (``R`` its reduced-cost sum), so a state is dropped when
    ``R`` plus the least price the items left pay for its slack (:class:`_Prices`) reaches
    ``g``, or when it cannot fit. Items go in order of their least rc-per-bit, so the items
    left are costly to move and the price tightens fast; at checkpoints every remaining
    alternative that no state can afford is eliminated, which usually fixes most of the core.
    Returns (choice or None, exhaustive, most states).
    """
    n = size.shape[0]
    rows = np.arange(n)
    rest = np.ones(n, dtype=bool)
    rest[core] = False
    base_s = float(size[rows[rest], fixed[rest]].sum())
    cap_tol = cap + abs(cap) * CAP_RTOL
    if len(core) == 0:
        return (fixed.copy() if base_s <= cap_tol else None), True, 1
    keep = rc[core] < g
    keep[np.arange(len(core)), fixed[core]] = True
    arg = size[core, fixed[core]]
    delta = np.where(keep, size[core], np.nan) - arg[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(keep & (delta != 0), rc[core] / np.abs(delta), np.inf)
    pending = np.argsort(ratio.min(axis=1), kind="stable")
    st = np.array([[base_s], [0.0], [0.0]])  # states: size, cost, reduced-cost sum
    done: list[tuple[list[int], list[np.ndarray], np.ndarray, np.ndarray]] = []
    rc_core = rc[core]
    exhaustive, most, k, check = True, 1, 0, 0
    prices = _Prices(pending, keep, delta, ratio, arg, cap, lam)
    while k < len(pending):
        if k == check:
            pending, st = _eliminate(k, pending, st, keep, delta, rc_core, prices, g,
                                     size[core, fixed[core]], cost[core, fixed[core]])
            prices = _Prices(pending, keep, delta, ratio, arg, cap, lam)
            check = max(8, 4 * k)
            if k == len(pending):
                break
        if k % 64 == 0 and time.perf_counter() > deadline:
            return None, False, most
        # Several items per level while the product stays small: numpy overhead, not
        # arithmetic, dominates levels with few states.
        group = [int(pending[k])]
        width = int(keep[group[0]].sum())
        stop = min(len(pending), check if check > k else len(pending))
        while k + len(group) < stop and len(group) < 8:
            q = int(keep[pending[k + len(group)]].sum())
            if width * q * st.shape[1] > 4096:
                break
            group.append(int(pending[k + len(group)]))
            width *= q
        jss = [np.flatnonzero(keep[pos]) for pos in group]
        v = np.zeros((3, 1))
        for pos, js in zip(group, jss, strict=True):
            i = core[pos]
            vi = np.stack([size[i, js], cost[i, js], rc_core[pos, js]])
            v = (v[:, :, None] + vi[:, None, :]).reshape(3, -1)
        m_prev = st.shape[1]
        new = (v[:, :, None] + st[:, None, :]).reshape(3, -1)
        k += len(group)
        sigma = prices.shift[k] - new[0]
        bound = new[2] + prices.price(k, sigma)
        idx = np.flatnonzero((sigma >= prices.floor[k] - (cap_tol - cap)) & (bound < g))
        if len(idx) == 0:
            return None, exhaustive, most
        o = idx[np.lexsort((new[1, idx], new[0, idx]))]  # by size, cheapest first on equal size
        cs = new[1, o]
        keep_o = np.empty(len(o), dtype=bool)
        keep_o[0] = True
        np.less(cs[1:], np.minimum.accumulate(cs)[:-1], out=keep_o[1:])
        o = o[keep_o]  # strictly cheaper than every smaller state: Pareto-optimal
        if len(o) > max_states:
            exhaustive = False
            o = np.sort(o[np.argpartition(bound[o], max_states)[:max_states]])
            o = o[np.argsort(new[0, o], kind="stable")]
        most = max(most, len(o))
        st = new[:, o]
        done.append((group, jss, o % m_prev, o // m_prev))
    if st.shape[1] == 0 or st[0].min() > cap_tol:
        return None, exhaustive, most
    best = int(np.argmin(np.where(st[0] <= cap_tol, st[1], np.inf)))
    choice = fixed.copy()
    for group, jss, parent, combo in reversed(done):
        picks = np.unravel_index(int(combo[best]), [len(js) for js in jss])
        for pos, js, p in zip(group, jss, picks, strict=True):
            choice[core[pos]] = js[int(p)]
        best = int(parent[best])
    return choice, exhaustive, most


class _Prices:
    """Least price the items ``pending[k:]`` pay to end with a given slack.

    ``σ = cap − S − Σ_left s_arg`` is the slack if the items left stay at their rc = 0 slot.
    Slack costs λ per bit unless items move up (≥ ρ_up per bit, at most ``up_room`` bits); an
    overflow (σ < 0) must be removed by moving items down at ≥ ρ_down per bit (at most
    ``down_room`` bits: ``floor``). The price is convex piecewise linear:
    ``max(−ρ_down·σ, a·σ, λ·σ − (λ − a)·up_room)`` with ``a = min(λ, ρ_up)``.
    """

    def __init__(self, pending: np.ndarray, keep: np.ndarray, delta: np.ndarray,
                 ratio: np.ndarray, arg: np.ndarray, cap: float, lam: float) -> None:
        d = np.where(keep[pending], delta[pending], 0.0)
        r = ratio[pending]
        up = np.where(d > 0, r, np.inf).min(axis=1)
        down = np.where(d < 0, r, np.inf).min(axis=1)

        def suffix(x: np.ndarray, minimum: bool) -> np.ndarray:
            acc = np.minimum.accumulate(x[::-1]) if minimum else np.cumsum(x[::-1])
            return np.concatenate([acc[::-1], [np.inf if minimum else 0.0]])

        rho_up, rho_down = suffix(up, True), suffix(down, True)
        up_room = suffix(d.max(axis=1, initial=0.0), False)
        self.shift = cap - suffix(arg[pending], False)
        self.floor = -suffix(-d.min(axis=1, initial=0.0), False)
        a = np.minimum(lam, rho_up)
        self.lines = np.stack([-np.minimum(rho_down, 1e200), a, np.full_like(a, lam),
                               (lam - a) * up_room], axis=1)

    def price(self, k: int, sigma: np.ndarray) -> np.ndarray:
        d, a, lam, off = self.lines[k]
        return np.maximum(np.maximum(d * sigma, a * sigma), lam * sigma - off)


def _eliminate(k: int, pending: np.ndarray, st: np.ndarray, keep: np.ndarray, delta: np.ndarray,
               rc: np.ndarray, prices: _Prices, g: float, arg_s: np.ndarray,
               arg_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop alternatives of ``pending[k:]`` that no state can afford; fix items left with one.

    Alternative (i, j) moves item i by δ_ij bits for rc_ij; with the other items priced as in
    :class:`_Prices` (which, including i, only underestimates), the best any state can do is
    ``min_s R_s + rc_ij + price(σ_s − δ_ij)``; if that reaches ``g`` the slot is eliminated.
    Fixed items join every state at their rc = 0 slot. Mutates ``keep``.
    """
    tail = pending[k:]
    alt = keep[tail] & (delta[tail] != 0) | (keep[tail] & (rc[tail] > 0))
    ii, jj = np.nonzero(alt)
    if len(ii) == 0:
        drop = tail
    else:
        dvals = delta[tail[ii], jj]
        uniq, inv = np.unique(dvals, return_inverse=True)
        if len(uniq) * st.shape[1] > 4_000_000:
            return pending, st  # too costly to test here; the DP bound still applies
        sigma = prices.shift[k] - st[0]
        best = np.min(st[2][None, :] + prices.price(k, sigma[None, :] - uniq[:, None]), axis=1)
        dead = rc[tail[ii], jj] + best[inv] >= g
        keep[tail[ii[dead]], jj[dead]] = False
        n_keep = keep[tail].sum(axis=1)
        drop = tail[n_keep <= 1]
    if len(drop) == 0:
        return pending, st
    st = st.copy()
    st[0] += arg_s[drop].sum()
    st[1] += arg_c[drop].sum()
    return np.concatenate([pending[:k], tail[~np.isin(tail, drop)]]), st
