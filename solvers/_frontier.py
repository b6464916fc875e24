"""The size-vs-cost Pareto frontier of a cost table.

The convex part comes from one Lagrangian sweep: start every item (tie group) at its smallest
hull point and take hull steps in order of decreasing efficiency ``Δcost/Δsize`` — one sort of
all steps. Every prefix of that order is a plan on the lower convex hull of the aggregate
(size, cost) set, and it is exactly optimal for a budget equal to its own size (the LP at that
capacity has an integral solution: the prefix). Points between hull vertices (non-convex parts)
come from exact MCKP solves at requested budgets.

Uncertainty: when the table has a ``cost_std`` column, every point also gets the standard
deviation of its predicted cost (:func:`prefix_variances`), and the plots draw a ±kσ band
around the frontier with measured points on top (:mod:`solvers._frontier_plot`).

Example:
    >>> from allocator.core.synth import synth_table
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

from allocator.core.atomic import atomic_path
from allocator.core.budget import Budget
from allocator.core.errors import InvalidParameterError
from allocator.core.plan import BitPlan, SolverInfo, plan_rows
from allocator.core.result import SolveStatus
from allocator.core.table import CostTable
from solvers._frontier_plot import MeasuredLike, MeasuredPoint, load_measured, plot_html, plot_static
from solvers._hull import lower_hulls
from solvers._mckp import MckpSolver
from solvers._problem import Problem, build_problem

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Frontier", "FrontierPoint", "MeasuredPoint", "PointKind", "compute_frontier",
           "item_variances", "load_measured", "plan_cost_std", "prefix_variances"]


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
    cost_std: float | None = None  #: σ of ``cost``; None when the table has no ``cost_std``


@dataclass(frozen=True, kw_only=True, eq=False)
class Frontier:
    """Frontier points by increasing size; :meth:`plan` rebuilds any point's plan.

    Attributes:
        table: the table the frontier was computed on.
        size_bits, cost: (P,) per point; bpw = size_bits / table.total_params.
        kind: (P,) :class:`PointKind` values.
        status: (P,) solver status of each point (``optimal`` for hull points).
        cost_std: (P,) standard deviation σ of each point's predicted cost, assuming
            independent per-unit errors (:func:`prefix_variances`); ``None`` when the table
            has no ``cost_std`` column.
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
    cost_std: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.size_bits)

    @property
    def bpw(self) -> np.ndarray:
        return self.size_bits / self.table.total_params

    @property
    def points(self) -> list[FrontierPoint]:
        std = [None] * len(self) if self.cost_std is None else self.cost_std.tolist()
        return [FrontierPoint(size_bits=float(s), bpw=float(b), cost=float(c), kind=PointKind(k),
                              cost_std=sd)
                for s, b, c, k, sd in zip(self.size_bits, self.bpw, self.cost, self.kind, std,
                                          strict=True)]

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
        """One row per point: size_bits, bpw, cost, [cost_std,] kind, status.

        The ``cost_std`` column is present only when the table has one (no column rather
        than a column of NaN, so a CSV never claims an uncertainty nobody estimated).
        """
        import pandas as pd

        cols: dict[str, np.ndarray] = {"size_bits": self.size_bits, "bpw": self.bpw,
                                       "cost": self.cost}
        if self.cost_std is not None:
            cols["cost_std"] = self.cost_std
        cols |= {"kind": self.kind.astype(str), "status": self.status.astype(str)}
        return pd.DataFrame(cols)

    def save_csv(self, path: str | Path) -> Path:
        p = Path(path)
        with atomic_path(p) as tmp:  # a failed write never leaves a truncated CSV
            self.to_frame().to_csv(tmp, index=False)
        return p

    def plot(self, path: str | Path, *, measured: Sequence[MeasuredLike] | None = None,
             band_sigma: float = 2.0, log_cost: bool = True) -> Path:
        """Static plot (matplotlib, Agg): predicted cost vs bits per weight.

        The hull is a line, exact points are markers, the band is cost ± ``band_sigma``·σ
        (drawn only when the table has ``cost_std`` and ``band_sigma > 0``; on a log axis its
        lower edge is clipped above 0), and ``measured`` points — :class:`MeasuredPoint` or
        ``(bpw, error[, label])`` tuples — are drawn on top.
        """
        return plot_static(self, path, measured=measured, band_sigma=band_sigma,
                           log_cost=log_cost)

    def plot_interactive(self, path: str | Path, *, measured: Sequence[MeasuredLike] | None = None,
                         band_sigma: float = 2.0, log_cost: bool = True) -> Path:
        """The same plot as :meth:`plot`, as a self-contained plotly HTML page.

        plotly.js is embedded (works offline); hovering a point shows bpw, size, cost, σ and
        kind. Needs ``plotly`` (the ``search`` extra).
        """
        return plot_html(self, path, measured=measured, band_sigma=band_sigma,
                         log_cost=log_cost)


def item_variances(table: CostTable, problem: Problem) -> np.ndarray | None:
    """Dense (n_items, K) ``v_ij = Σ_{u ∈ item i} cost_std(u, j)²``, or None without cost_std.

    A tie group sums the variances of its member units' own rows (their errors are independent
    like any two units'); slots a unit lacks stay 0 (never on a hull, so never used).
    """
    if "cost_std" not in table.df.columns:
        return None
    std = table.df["cost_std"].to_numpy(np.float64)
    ix = table.index
    var = np.zeros((problem.n_items, problem.n_slots))
    np.add.at(var, (problem.item_of_unit[ix.unit_codes], ix.option_codes), std * std)
    return var


def prefix_variances(var: np.ndarray, vertices: np.ndarray, n_vertices: np.ndarray,
                     step_t: np.ndarray, step_item: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Variance of the predicted cost of every sweep prefix, without rebuilding plans.

    With independent per-unit errors the predicted cost ``C(x) = Σ_u c_u(x_u)`` has variance

        σ²(x) = Σ_u cost_std(u, x_u)² = Σ_i v_i(x_i)

    (``v`` from :func:`item_variances`). Prefix ``p`` of the sweep differs from prefix ``p−1``
    in one item moving from hull vertex ``t`` to ``t+1``, so
    ``σ²_p = σ²_0 + Σ_{s<p} Δv_s`` with ``Δv_s = v_i(vertex_{t+1}) − v_i(vertex_t)``.
    The same sum taken backwards from the last prefix, ``σ²_p = σ²_S − Σ_{s≥p} Δv_s``, has a
    rounding error bounded by ``ε Σ_{s≥p} |Δv_s|`` instead of ``ε Σ_{s<p} |Δv_s|``; each point
    takes the direction with the smaller bound, so small variances at the far end of a sweep
    keep their relative precision.

    Args:
        var: (n_items, K) per-slot variance; vertices: (K, n_items) hull vertex slots;
        n_vertices: (n_items,); step_t, step_item: hull vertex index and item of each flat
        step; order: the sweep order of the flat steps.

    Returns:
        (S + 1,) σ²_p for p = 0..S (S = number of steps), clipped at 0.
    """
    cols = np.arange(var.shape[0])
    first = float(var[cols, vertices[0]].sum())
    last = float(var[cols, vertices[n_vertices - 1, cols]].sum())
    dv = (var[step_item, vertices[step_t + 1, step_item]]
          - var[step_item, vertices[step_t, step_item]])[order]
    zero = np.zeros(1)
    forward = first + np.concatenate([zero, np.cumsum(dv)])
    tail = np.concatenate([np.cumsum(dv[::-1])[::-1], zero])
    backward = last - tail
    err_fwd = np.concatenate([zero, np.cumsum(np.abs(dv))]) + first
    err_bwd = np.concatenate([np.cumsum(np.abs(dv)[::-1])[::-1], zero]) + last
    out = np.where(err_fwd <= err_bwd, forward, backward)
    return np.maximum(out, 0.0)


def plan_cost_std(table: CostTable, plan: BitPlan) -> float | None:
    """σ of a plan's predicted cost, ``sqrt(Σ_u cost_std(u, x_u)²)``; None without cost_std."""
    if "cost_std" not in table.df.columns:
        return None
    std = table.df["cost_std"].to_numpy(np.float64)[plan_rows(table, plan.choice)]
    return float(np.sqrt(np.sum(std * std)))


def compute_frontier(table: CostTable, *, budgets: Sequence[Budget] | None = None) -> Frontier:
    """Every prefix of the Lagrangian sweep, plus exact MCKP points at ``budgets``.

    Ties are respected (the sweep runs on tie groups, via :func:`build_problem` with a budget
    that allows everything). Exact points whose budget is infeasible are left out.
    """
    loose = Budget(bpw=1e12)
    problem = build_problem(table, loose)
    n = problem.n_items
    rows = np.arange(n)
    hull = lower_hulls(problem.size, problem.cost)
    item, ds, dc, eff = hull.flat_steps()
    step_t, _ = np.nonzero(hull.eff > -np.inf)  # the same mask and layout as flat_steps
    order = np.argsort(-eff, kind="stable")
    size0 = float(problem.size[rows, hull.start].sum())
    cost0 = float(problem.cost[rows, hull.start].sum())
    sizes = np.concatenate([[size0], size0 + np.cumsum(ds[order])])
    costs = np.concatenate([[cost0], cost0 - np.cumsum(dc[order])])
    prefix = np.arange(len(sizes))
    kinds = np.full(len(sizes), PointKind.HULL.value, dtype=object)
    status = np.full(len(sizes), SolveStatus.OPTIMAL.value, dtype=object)
    var = item_variances(table, problem)
    stds = (None if var is None else
            np.sqrt(prefix_variances(var, hull.vertices, hull.n_vertices, step_t, item, order)))
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
        if stds is not None:
            stds = np.concatenate([stds, [plan_cost_std(table, e[2]) for e in exact]])
    sort = np.lexsort((prefix < 0, sizes))
    position = np.empty_like(sort)
    position[sort] = np.arange(len(sort))
    first_exact = len(sort) - len(exact)
    where = {int(position[first_exact + j]): e[2] for j, e in enumerate(exact)}
    return Frontier(table=table, size_bits=sizes[sort], cost=costs[sort], kind=kinds[sort],
                    status=status[sort], _problem=problem, _order=order, _step_item=item,
                    _vertices=hull.vertices, _prefix=prefix[sort], _exact=where,
                    cost_std=None if stds is None else stds[sort])
