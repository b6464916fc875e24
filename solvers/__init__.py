"""Solvers: cost table + budget → bit plan, and the size-vs-cost Pareto frontier.

Solvers run on a table alone; importing :mod:`solvers` never imports torch. Implementations are
registered by name in preference order; instances are accepted everywhere a name is.

Example:
    >>> from allocator import Budget, CostTable
    >>> import solvers
    >>> t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
    ...     options=["int2-g128-asym", "int4-g128-asym"], cost=[[4.0, 1.0], [9.0, 1.0]])
    >>> r = solvers.solve(t, Budget(bpw=3.25), solver="mckp")
    >>> r.status.value, r.plan.choice
    ('optimal', {'a': 'int2-g128-asym', 'b': 'int4-g128-asym'})
"""

from __future__ import annotations

from allocator.core.budget import Budget
from allocator.core.result import SolveResult
from allocator.core.table import CostTable
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._bayesian import BayesianSolver, pareto_front, search_space
from solvers._frontier import Frontier, compute_frontier, load_measured
from solvers._problem import Problem, build_problem
from solvers._registry import SOLVERS, available_solvers, get_solver, solver_class
from solvers._tolerances import within_cap

__all__ = [
    "SOLVERS",
    "BaseSolver",
    "BayesianSolver",
    "Frontier",
    "Problem",
    "RawSolution",
    "SolverCapabilities",
    "available_solvers",
    "build_problem",
    "frontier",
    "get_solver",
    "load_measured",
    "pareto_front",
    "search_space",
    "solve",
    "solver_class",
    "within_cap",
]


def solve(
    table: CostTable, budget: Budget, *, solver: str | BaseSolver | None = None, seed: int | None = None
) -> SolveResult:
    """Solve ``table`` under ``budget`` with ``solver`` (default: the exact ``mckp``)."""
    return get_solver(solver).solve(table, budget, seed=seed)


def frontier(table: CostTable, *, budgets: list[Budget] | None = None) -> Frontier:
    """The size-vs-cost Pareto frontier of ``table`` (see :mod:`solvers._frontier`)."""
    return compute_frontier(table, budgets=budgets)
