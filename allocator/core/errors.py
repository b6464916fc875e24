"""One error hierarchy for bitalloc.

Every message names the bad value and says how to fix it, so the CLI and the service can show
``str(error)`` as a single line without a traceback.
"""

from __future__ import annotations

__all__ = [
    "AllocatorError",
    "BackendError",
    "DependencyUnavailableError",
    "EstimatorUnavailableError",
    "ExportError",
    "InfeasibleBudgetError",
    "InvalidBudgetError",
    "InvalidCostTableError",
    "InvalidParameterError",
    "InvalidPlanError",
    "ModelError",
    "PlanCheckError",
    "SolverUnavailableError",
    "UnknownNameError",
]


class AllocatorError(Exception):
    """Root of every error raised on purpose by bitalloc."""


class InvalidParameterError(AllocatorError, ValueError, TypeError):
    """A parameter has a bad type or value (dual inheritance keeps ``except ValueError`` working)."""


class InvalidCostTableError(AllocatorError, ValueError):
    """A cost table breaks the schema in ``design.md`` (names the offending rows)."""


class InvalidBudgetError(InvalidParameterError):
    """A budget is malformed (not merely infeasible: that is a solve status)."""


class InvalidPlanError(AllocatorError, ValueError):
    """A bit plan file or object is malformed or does not fit the table/model it is used with."""


class PlanCheckError(AllocatorError):
    """A solver produced a plan that breaks an invariant (one option per unit, ties, caps)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        head = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"plan check failed: {head}{more}")


class InfeasibleBudgetError(AllocatorError, ValueError):
    """Raised only by strict façades; solvers return an ``infeasible`` status instead."""


class UnknownNameError(InvalidParameterError, KeyError):
    """A registry lookup (solver, estimator, format, export target) got an unknown name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DependencyUnavailableError(AllocatorError, ImportError):
    """An optional package a solver or an estimator needs is not installed."""


class SolverUnavailableError(DependencyUnavailableError):
    """An optional solver backend (PuLP, HiGHS, cvxpy, Optuna) is not installed."""


class EstimatorUnavailableError(DependencyUnavailableError):
    """A package a sensitivity estimator needs (torch, transformers) is not installed."""


class ModelError(AllocatorError, ValueError):
    """A model cannot be loaded or has nothing to quantize."""


class BackendError(AllocatorError, RuntimeError):
    """Applying, verifying or evaluating a plan on a model failed."""


class ExportError(AllocatorError, ValueError):
    """A plan cannot be expressed by an export target without changing it."""
