"""The solver registry: name → class in preference order, loaded on first use (so ``import
solvers`` imports no optional dependency). A module of its own, re-exported by :mod:`solvers`,
so solvers that call other solvers (the Bayesian warm start, the Lagrangian hand-off to ``ilp``)
look them up without importing their own package.
"""

from __future__ import annotations

import importlib

from allocator.core.errors import UnknownNameError
from solvers._base import BaseSolver

__all__ = ["SOLVERS", "available_solvers", "get_solver", "solver_class"]

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
