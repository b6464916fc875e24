"""The size-vs-cost Pareto frontier of a cost table.

The convex part comes from one Lagrangian sweep: start every item (tie group) at its smallest
hull point and take hull steps in order of decreasing efficiency ``Δcost/Δsize`` — one sort of
all steps. Every prefix of that order is a plan on the lower convex hull of the aggregate
(size, cost) set, and it is exactly optimal for a budget equal to its own size (the LP at that
capacity has an integral solution: the prefix). Points between hull vertices (non-convex parts)
come from exact MCKP solves at requested budgets.

Example:
    >>> from allocator.synth import synth_table
    >>> f = compute_frontier(synth_table(n_units=7, n_options=3, seed=0))
    >>> len(f) == 1 + 7 * 2 and f.plan(0).summary.bpw < f.plan(len(f) - 1).summary.bpw
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from allocator.budget import Budget
from allocator.errors import InvalidParameterError
from allocator.plan import BitPlan, SolverInfo
from allocator.table import CostTable
from solvers._hull import lower_hulls
from solvers._problem import Problem, build_problem

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Frontier", "FrontierPoint", "PointKind", "compute_frontier"]


class PointKind(StrEnum):
    """How a frontier point was obtained."""

    HULL = "hull"  #: a prefix of the Lagrangian sweep (optimal at its own size)
    EXACT = "exact"  #: an exact MCKP solve at a requested budget


@dataclass(frozen=True, kw_only=True)
class FrontierPoint:
    size_bits: float
    bpw: float
    cost: float
    kind: PointKind


@dataclass(frozen=True, kw_only=True, eq=False)
class Frontier:
    """Frontier points by increasing size; :meth:`plan` rebuilds any point's plan.

    Attributes:
        table: the table the frontier was computed on.
        size_bits, cost: (P,) per point; bpw = size_bits / table.total_params.
        kind: (P,) :class:`PointKind` values.
        status: (P,) solver status of each point (``optimal`` for hull points).
    """

    table: CostTable
    size_bits: np.ndarray
    cost: np.ndarray
    kind: np.ndarray
    status: np.ndarray
    _problem: Problem = field(repr=False)
    _order: np.ndarray = field(repr=False)  # hull steps (flat, t-major) by decreasing efficiency
    _step_item: np.ndarray = field(repr=False)
    _vertices: np.ndarray = field(repr=False)  # (K, n_items) hull vertex slots
    _prefix: np.ndarray = field(repr=False)  # per point: steps taken (-1 for exact points)
    _exact: dict[int, BitPlan] = field(repr=False, default_factory=dict)

    def __len__(self) -> int:
        return len(self.size_bits)

    @property
    def bpw(self) -> np.ndarray:
        return self.size_bits / self.table.total_params

    @property
    def points(self) -> list[FrontierPoint]:
        return [FrontierPoint(size_bits=float(s), bpw=float(b), cost=float(c), kind=PointKind(k))
                for s, b, c, k in zip(self.size_bits, self.bpw, self.cost, self.kind, strict=True)]

    def plan(self, i: int) -> BitPlan:
        """The plan of point ``i`` (hull points are rebuilt from the sweep order)."""
        if not -len(self) <= i < len(self):
            raise InvalidParameterError(f"frontier point {i} out of range 0..{len(self) - 1}")
        i = i % len(self)
        if i in self._exact:
            return self._exact[i]
        p = self._problem
        steps = int(self._prefix[i])
        counts = np.bincount(self._step_item[self._order[:steps]], minlength=p.n_items)
        choice = self._vertices[counts, np.arange(p.n_items)]
        rows = p.rows_for(choice)
        total = self.table.total_params
        budget = Budget(bpw=float(p.size[np.arange(p.n_items), choice].sum()) / total)
        info = SolverInfo(name="frontier", status="optimal", gap=0.0)
        return BitPlan.from_rows(self.table, rows, budget=budget, solver=info)

    def to_frame(self) -> pd.DataFrame:
        """One row per point: size_bits, bpw, cost, kind, status."""
        import pandas as pd

        return pd.DataFrame({"size_bits": self.size_bits, "bpw": self.bpw, "cost": self.cost,
                             "kind": self.kind.astype(str), "status": self.status.astype(str)})

    def save_csv(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_csv(p, index=False)
        return p

    def plot(self, path: str | Path, *, log_cost: bool = True) -> Path:
        """Predicted cost vs bits per weight: the hull as a line, exact points as markers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        hull = self.kind == PointKind.HULL.value
        ax.plot(self.bpw[hull], self.cost[hull], "-", lw=1.2, label="convex hull (Lagrangian)")
        if (~hull).any():
            ax.plot(self.bpw[~hull], self.cost[~hull], "o", ms=5, label="exact MCKP")
        if log_cost and (self.cost > 0).any():
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (overhead included)")
        ax.set_ylabel("predicted cost")
        ax.set_title(f"Pareto frontier ({self.table.n_units} units)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
        return out


def compute_frontier(table: CostTable, *, budgets: Sequence[Budget] | None = None) -> Frontier:
    """Every prefix of the Lagrangian sweep, plus exact MCKP points at ``budgets``.

    Ties are respected (the sweep runs on tie groups, via :func:`build_problem` with a budget
    that allows everything). Exact points whose budget is infeasible are left out.
    """
    from allocator.result import SolveStatus
    from solvers._mckp import MckpSolver

    loose = Budget(bpw=1e12)
    problem = build_problem(table, loose)
    n = problem.n_items
    rows = np.arange(n)
    hull = lower_hulls(problem.size, problem.cost)
    item, ds, dc, eff = hull.flat_steps()
    order = np.argsort(-eff, kind="stable")
    size0 = float(problem.size[rows, hull.start].sum())
    cost0 = float(problem.cost[rows, hull.start].sum())
    sizes = np.concatenate([[size0], size0 + np.cumsum(ds[order])])
    costs = np.concatenate([[cost0], cost0 - np.cumsum(dc[order])])
    prefix = np.arange(len(sizes))
    kinds = np.full(len(sizes), PointKind.HULL.value, dtype=object)
    status = np.full(len(sizes), SolveStatus.OPTIMAL.value, dtype=object)
    exact: list[tuple[float, float, BitPlan, str]] = []
    for b in budgets or []:
        res = MckpSolver().solve(table, b)
        if res.plan is not None:
            exact.append((res.plan.summary.size_bits, res.plan.summary.predicted_cost, res.plan,
                          str(res.status)))
    if exact:
        sizes = np.concatenate([sizes, [e[0] for e in exact]])
        costs = np.concatenate([costs, [e[1] for e in exact]])
        prefix = np.concatenate([prefix, -np.ones(len(exact), dtype=np.int64)])
        kinds = np.concatenate([kinds, np.full(len(exact), PointKind.EXACT.value, dtype=object)])
        status = np.concatenate([status, np.array([e[3] for e in exact], dtype=object)])
    sort = np.lexsort((prefix < 0, sizes))
    position = np.empty_like(sort)
    position[sort] = np.arange(len(sort))
    first_exact = len(sort) - len(exact)
    where = {int(position[first_exact + j]): e[2] for j, e in enumerate(exact)}
    return Frontier(table=table, size_bits=sizes[sort], cost=costs[sort], kind=kinds[sort],
                    status=status[sort], _problem=problem, _order=order, _step_item=item,
                    _vertices=hull.vertices, _prefix=prefix[sort], _exact=where)
