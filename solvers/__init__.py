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

import importlib

from allocator.core.budget import Budget
from allocator.core.errors import UnknownNameError
from allocator.core.result import SolveResult
from allocator.core.table import CostTable
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._bayesian import BayesianSolver, pareto_front, search_space
from solvers._frontier import Frontier, load_measured
from solvers._problem import Problem, build_problem

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
]

#: name → "module:Class", in preference order (the first is the default).
SOLVERS: dict[str, str] = {
    "mckp": "solvers._mckp:MckpSolver",
    "ilp": "solvers._ilp:IlpSolver",
    "closed_form": "solvers._closed_form:ClosedFormSolver",
    "cvxpy": "solvers._closed_form:CvxpySolver",
    "greedy": "solvers._greedy:GreedySolver",
    "brute_force": "solvers._brute_force:BruteForceSolver",
    "bayesian": "solvers._bayesian:BayesianSolver",
}


def solver_class(name: str) -> type[BaseSolver]:
    """The class registered under ``name``."""
    if name not in SOLVERS:
        raise UnknownNameError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    module, cls = SOLVERS[name].split(":")
    found: type[BaseSolver] = getattr(importlib.import_module(module), cls)
    return found


def available_solvers() -> list[str]:
    """Registered solvers whose optional dependencies are installed, in preference order."""
    return [n for n in SOLVERS if solver_class(n).is_available()]


def get_solver(solver: str | BaseSolver | None = None) -> BaseSolver:
    """A solver instance from a name, an instance (returned as is) or ``None`` (the default)."""
    if solver is None:
        solver = next(iter(SOLVERS))
    if isinstance(solver, BaseSolver):
        if solver.name in SOLVERS and type(solver) is not solver_class(solver.name):
            raise UnknownNameError(
                f"custom solver name {solver.name!r} shadows a built-in solver; rename it"
            )
        return solver
    if not isinstance(solver, str):
        raise UnknownNameError(f"solver must be a name or a BaseSolver, got {type(solver).__name__}")
    return solver_class(solver)()


def solve(
    table: CostTable, budget: Budget, *, solver: str | BaseSolver | None = None, seed: int | None = None
) -> SolveResult:
    """Solve ``table`` under ``budget`` with ``solver`` (default: the exact ``mckp``)."""
    return get_solver(solver).solve(table, budget, seed=seed)


def frontier(table: CostTable, *, budgets: list[Budget] | None = None) -> Frontier:
    """The size-vs-cost Pareto frontier of ``table`` (see :mod:`solvers._frontier`)."""
    from solvers._frontier import compute_frontier

    return compute_frontier(table, budgets=budgets)
