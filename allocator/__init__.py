"""bitalloc core: formats, cost tables, budgets, plans, the quantization backend, CLI and service.

Importing :mod:`allocator` is cheap: torch, pulp, cvxpy and optuna load only when used.
"""

from __future__ import annotations

from allocator.core.budget import Budget
from allocator.core.errors import (
    AllocatorError,
    BackendError,
    DependencyUnavailableError,
    EstimatorUnavailableError,
    ExportError,
    InfeasibleBudgetError,
    InvalidBudgetError,
    InvalidCostTableError,
    InvalidParameterError,
    InvalidPlanError,
    ModelError,
    PlanCheckError,
    SolverUnavailableError,
    UnknownNameError,
)
from allocator.core.formats import DEFAULT_OPTIONS, FormatKind, QuantFormat, parse_format, parse_options
from allocator.core.plan import Assignment, BitPlan, check_plan
from allocator.core.result import SolveResult, SolveStatus
from allocator.core.table import CostTable
from allocator.core.version import __version__

__all__ = [
    "DEFAULT_OPTIONS",
    "AllocatorError",
    "Assignment",
    "BackendError",
    "BitPlan",
    "Budget",
    "CostTable",
    "DependencyUnavailableError",
    "EstimatorUnavailableError",
    "ExportError",
    "FormatKind",
    "InfeasibleBudgetError",
    "InvalidBudgetError",
    "InvalidCostTableError",
    "InvalidParameterError",
    "InvalidPlanError",
    "ModelError",
    "PlanCheckError",
    "QuantFormat",
    "SolveResult",
    "SolveStatus",
    "SolverUnavailableError",
    "UnknownNameError",
    "__version__",
    "check_plan",
    "parse_format",
    "parse_options",
]
