"""Exhaustive enumeration: the exact oracle for tiny problems (and the conformance suite).

Every combination of valid slots is scored in vectorised chunks (mixed-radix digits → gathered
sums of cost, size and each capped resource); the cheapest one within every cap wins, the first
in enumeration order on ties. Refuses problems with more than ``max_combinations`` combinations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._problem import Problem
from solvers._tolerances import within_cap

__all__ = ["BruteForceSolver"]

_CHUNK = 1 << 16


class BruteForceSolver(BaseSolver):
    """Exact by enumeration; for tiny tables only.

    Example:
        >>> from allocator import Budget, CostTable
        >>> t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
        ...     options=["int2-g128-asym", "int4-g128-asym"], cost=[[4.0, 1.0], [9.0, 1.0]])
        >>> r = BruteForceSolver().solve(t, Budget(bpw=3.25))
        >>> r.status.value, r.objective, r.stats["combinations"]
        ('optimal', 5.0, 4.0)
    """

    name = "brute_force"
    capabilities = SolverCapabilities(exact=True, multi_resource=True)

    def __init__(self, *, max_combinations: int = 2_000_000) -> None:
        m = max_combinations
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InvalidParameterError(
                "The 'max_combinations' parameter of BruteForceSolver must be an int ≥ 1. "
                f"Got {m!r} instead.")
        self._max_combinations = m

    def params(self) -> dict[str, Any]:
        return {"max_combinations": self._max_combinations}

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        slots = [np.flatnonzero(row) for row in problem.valid]
        radix = np.array([len(s) for s in slots], dtype=np.int64)
        total = math.prod(int(r) for r in radix)
        if total > self._max_combinations:
            raise InvalidParameterError(
                f"brute_force would enumerate {total:.3g} combinations ({problem.n_items} units), "
                f"more than max_combinations={self._max_combinations}; use 'mckp' or 'ilp'")
        # per item, the values of its valid slots padded to the widest item
        width = int(radix.max())
        pad = np.zeros((problem.n_items, width), dtype=np.int64)
        for i, s in enumerate(slots):
            pad[i, : len(s)] = s
        rows = np.arange(problem.n_items)[:, None]
        mats = [problem.cost, problem.size, *(problem.resources[k] for k in sorted(problem.caps))]
        caps = [math.inf, problem.cap, *(problem.caps[k] for k in sorted(problem.caps))]
        tables = [m[rows, pad] for m in mats]
        best: tuple[float, int] | None = None
        for start in range(0, total, _CHUNK):
            idx = np.arange(start, min(start + _CHUNK, total), dtype=np.int64)
            digits = _digits(idx, radix)  # (n_items, chunk)
            ok = np.ones(len(idx), dtype=bool)
            sums = [t[rows, digits].sum(axis=0) for t in tables]
            for s, cap in zip(sums[1:], caps[1:], strict=True):
                ok &= within_cap(s, cap)
            if ok.any():
                cost = np.where(ok, sums[0], np.inf)
                at = int(np.argmin(cost))
                if best is None or cost[at] < best[0]:
                    best = (float(cost[at]), int(idx[at]))
        stats = {"combinations": float(total)}
        if best is None:
            return RawSolution(status=SolveStatus.INFEASIBLE, stats=stats,
                               message="no combination of options meets every cap")
        choice = pad[np.arange(problem.n_items), _digits(np.array([best[1]]), radix)[:, 0]]
        return RawSolution(status=SolveStatus.OPTIMAL, choice=choice, bound=best[0], stats=stats)


def _digits(idx: np.ndarray, radix: np.ndarray) -> np.ndarray:
    """Mixed-radix digits of ``idx`` (first item = most significant digit), (n_items, len(idx))."""
    out = np.empty((len(radix), len(idx)), dtype=np.int64)
    rest = idx.copy()
    for i in range(len(radix) - 1, -1, -1):
        out[i] = rest % radix[i]
        rest //= radix[i]
    return out
