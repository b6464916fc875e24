"""Greedy bit dropping (the HAWQ / AIMET AMP / NNCF baseline) and the shared repair moves.

``greedy``: start every item at its largest option, then repeatedly take the move with the least
cost increase per bit saved, ``Δcost / Δsize``, until the plan fits (:func:`shrink_to_fit`); then
spend what is left of the budget on the moves with the largest cost decrease per bit
(:func:`spend_leftover`, switch off with ``refill=False`` for the textbook baseline). Each item
keeps its current best move in a heap, so a solve costs O(moves · (log n + K)), not O(n²).

With resource caps every constraint is normalised by its cap (``u_k = res_k / cap_k``). While
some constraints are violated, a move's gain is its decrease of Σ u_k over the violated ones and
it may not push a satisfied constraint over its cap; when the heuristic gets stuck it reports
``error`` (the exact ``mckp`` and ``ilp`` decide such problems). The same two functions round and
repair the continuous solutions of ``closed_form`` and ``cvxpy``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from allocator.core.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._problem import Problem
from solvers._tolerances import CAP_RTOL, ZERO_CAP

__all__ = ["GreedySolver", "Knapsack", "repair", "shrink_to_fit", "spend_leftover"]



@dataclass(frozen=True, eq=False)
class Knapsack:
    """A problem's items as Python lists: valid slots, their costs and normalised resource use.

    ``use[i][j]`` is a tuple over constraints (size first, then the caps in name order) of
    ``resource / cap``; a plan fits when every constraint sums to at most 1. Slots that a zero cap
    forbids are dropped here.
    """

    slots: list[list[int]]
    cost: list[dict[int, float]]
    use: list[dict[int, tuple[float, ...]]]
    names: tuple[str, ...]

    @classmethod
    def from_problem(cls, problem: Problem) -> Knapsack:
        names = ("size", *sorted(problem.caps))
        mats = [problem.size, *(problem.resources[k] for k in names[1:])]
        caps = [problem.cap, *(problem.caps[k] for k in names[1:])]
        valid = problem.valid.copy()
        norm = []
        for mat, cap in zip(mats, caps, strict=True):
            if cap > ZERO_CAP:
                norm.append(np.where(valid, mat, 0.0) / cap)
            else:
                valid &= ~(mat > 0)
                norm.append(np.zeros_like(mat))
        stacked = np.stack(norm, axis=-1)  # (n, K, m)
        slots = [np.flatnonzero(row).tolist() for row in valid]
        cost = [dict(zip(js, problem.cost[i, js].tolist(), strict=True))
                for i, js in enumerate(slots)]
        use = [dict(zip(js, map(tuple, stacked[i, js].tolist()), strict=True))
               for i, js in enumerate(slots)]
        return cls(slots=slots, cost=cost, use=use, names=names)

    def used(self, choice: np.ndarray) -> list[float]:
        """Normalised use of every constraint by ``choice``."""
        tot = [0.0] * len(self.names)
        for i, j in enumerate(choice.tolist()):
            for k, u in enumerate(self.use[i][j]):
                tot[k] += u
        return tot


def _fits(du: tuple[float, ...] | list[float], used: list[float], skip: list[bool]) -> bool:
    return all(s or u + d <= 1.0 + CAP_RTOL for u, d, s in zip(used, du, skip, strict=True))


def _shrink_move(ks: Knapsack, i: int, cur: int, viol: list[bool],
                 used: list[float]) -> tuple[float, int] | None:
    """Item ``i``'s best move while ``viol`` constraints are over: least Δcost per gain."""
    best: tuple[float, int] | None = None
    u0, c0 = ks.use[i][cur], ks.cost[i][cur]
    for j in ks.slots[i]:
        u = ks.use[i][j]
        gain = sum(a - b for a, b, v in zip(u0, u, viol, strict=True) if v)
        if j == cur or gain <= 0:
            continue
        if not _fits([b - a for a, b in zip(u0, u, strict=True)], used, viol):
            continue
        cand = ((ks.cost[i][j] - c0) / gain, j)
        if best is None or cand < best:
            best = cand
    return best


def shrink_to_fit(ks: Knapsack, choice: np.ndarray) -> np.ndarray | None:
    """Drop options until every constraint fits (``None`` when the heuristic gets stuck).

    Property: the result fits every constraint; items whose moves gain nothing are untouched.
    """
    choice = choice.copy()
    used = ks.used(choice)
    while True:
        viol = [u > 1.0 + CAP_RTOL for u in used]
        if not any(viol):
            return choice
        heap = []
        for i in range(len(ks.slots)):
            mv = _shrink_move(ks, i, int(choice[i]), viol, used)
            if mv is not None:
                heap.append((mv[0], i, mv[1]))
        heapq.heapify(heap)
        changed = False
        while heap and not changed:
            _, i, j = heapq.heappop(heap)
            cur = int(choice[i])
            du = [b - a for a, b in zip(ks.use[i][cur], ks.use[i][j], strict=True)]
            if not _fits(du, used, viol):  # a satisfied constraint has less room now
                mv = _shrink_move(ks, i, cur, viol, used)
                if mv is not None:
                    heapq.heappush(heap, (mv[0], i, mv[1]))
                continue
            choice[i] = j
            used = [a + d for a, d in zip(used, du, strict=True)]
            changed = any(v and u <= 1.0 + CAP_RTOL for v, u in zip(viol, used, strict=True))
            mv = _shrink_move(ks, i, j, viol, used)
            if mv is not None and not changed:
                heapq.heappush(heap, (mv[0], i, mv[1]))
        if not changed:
            return None  # no move reduces the violated constraints without breaking another


def _spend_move(ks: Knapsack, i: int, cur: int, used: list[float]) -> tuple[float, int] | None:
    """Item ``i``'s best cost-lowering move that fits: most negative Δcost per unit of room."""
    best: tuple[float, int] | None = None
    u0, c0 = ks.use[i][cur], ks.cost[i][cur]
    none = [False] * len(used)
    for j in ks.slots[i]:
        dc = ks.cost[i][j] - c0
        if j == cur or not dc < 0:
            continue
        du = [b - a for a, b in zip(u0, ks.use[i][j], strict=True)]
        if not _fits(du, used, none):
            continue
        cand = (dc / max(sum(d for d in du if d > 0), 1e-300), j)
        if best is None or cand < best:
            best = cand
    return best


def spend_leftover(ks: Knapsack, choice: np.ndarray) -> np.ndarray:
    """Take cost-lowering moves that still fit, best Δcost per unit of room first.

    Property: the cost never rises and a plan that fits keeps fitting.
    """
    choice = choice.copy()
    used = ks.used(choice)
    heap = []
    for i in range(len(ks.slots)):
        mv = _spend_move(ks, i, int(choice[i]), used)
        if mv is not None:
            heap.append((mv[0], i, mv[1]))
    heapq.heapify(heap)
    while heap:
        _, i, j = heapq.heappop(heap)
        cur = int(choice[i])
        du = [b - a for a, b in zip(ks.use[i][cur], ks.use[i][j], strict=True)]
        if _fits(du, used, [False] * len(used)):
            choice[i] = j
            used = [a + d for a, d in zip(used, du, strict=True)]
        mv = _spend_move(ks, i, int(choice[i]), used)
        if mv is not None:
            heapq.heappush(heap, (mv[0], i, mv[1]))
    return choice


def repair(problem: Problem, choice: np.ndarray, *, refill: bool = True) -> np.ndarray | None:
    """:func:`shrink_to_fit` then (optionally) :func:`spend_leftover` on ``problem``."""
    ks = Knapsack.from_problem(problem)
    if not all(ks.slots):  # a zero cap forbids every option of some unit
        return None
    for i, j in enumerate(choice.tolist()):
        if j not in ks.cost[i]:  # a slot a zero cap forbids: start that item at its smallest
            choice[i] = min((ks.use[i][s][0], ks.cost[i][s], s) for s in ks.slots[i])[2]
    fitted = shrink_to_fit(ks, choice)
    if fitted is None or not refill:
        return fitted
    return spend_leftover(ks, fitted)


class GreedySolver(BaseSolver):
    """Greedy bit dropping from the largest options (see the module docstring).

    A heuristic: the plan always fits, its cost is not certified (no bound).

    Example:
        >>> from allocator import Budget, CostTable
        >>> t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
        ...     options=["int2-g128-asym", "int4-g128-asym"], cost=[[4.0, 1.0], [9.0, 1.0]])
        >>> GreedySolver().solve(t, Budget(bpw=3.25)).plan.choice
        {'a': 'int2-g128-asym', 'b': 'int4-g128-asym'}
    """

    name = "greedy"
    capabilities = SolverCapabilities(exact=False, multi_resource=True)

    def __init__(self, *, refill: bool = True) -> None:
        self._refill = bool(refill)

    def params(self) -> dict[str, Any]:
        return {"refill": self._refill}

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        # largest option of every item; among equal sizes the cheaper one
        order = np.lexsort((np.where(problem.valid, problem.cost, np.inf),
                            -np.where(problem.valid, problem.size, -np.inf)), axis=-1)
        start = order[:, 0].astype(np.int64)
        choice = repair(problem, start, refill=self._refill)
        if choice is None:
            return RawSolution(
                status=SolveStatus.ERROR,
                message="greedy got stuck between resource caps; use 'mckp' or 'ilp'")
        return RawSolution(status=SolveStatus.FEASIBLE, choice=choice)
