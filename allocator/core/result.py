"""Solve results: one status vocabulary, a plan when there is one, bound and gap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from allocator.core.plan import BitPlan

__all__ = ["SolveResult", "SolveStatus"]


class SolveStatus(StrEnum):
    """Outcome of a solve."""

    OPTIMAL = "optimal"  #: certified optimal (gap within the solver's tolerance)
    FEASIBLE = "feasible"  #: a valid plan with a known gap to the bound
    INFEASIBLE = "infeasible"  #: no plan fits; ``min_feasible`` says what would
    TIME_LIMIT = "time_limit"  #: stopped by the time limit (a plan may be attached)
    ERROR = "error"  #: the backend failed or returned a plan that broke a constraint

    @property
    def has_plan(self) -> bool:
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE, SolveStatus.TIME_LIMIT)


@dataclass(frozen=True, kw_only=True)
class SolveResult:
    """What every solver returns.

    Attributes:
        status: see :class:`SolveStatus`.
        plan: the plan (``None`` when infeasible or on error).
        objective: Σ cost of the plan.
        bound: a proven lower bound on the optimum (``None`` if the solver proves none).
        gap: relative gap ``(objective − bound) / max(|objective|, tiny)``; 0 when optimal.
        seconds: wall time of the solve.
        solver: registered name of the solver.
        message: a human-readable line (why infeasible, what failed).
        min_feasible: for ``infeasible``: the smallest feasible primary budget (bpw or bytes).
        stats: solver-specific numbers (nodes, iterations, hull points ...).
    """

    status: SolveStatus
    solver: str
    plan: BitPlan | None = None
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    seconds: float = 0.0
    message: str = ""
    min_feasible: float | None = None
    stats: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status), "solver": self.solver, "objective": self.objective,
            "bound": self.bound, "gap": self.gap, "seconds": self.seconds, "message": self.message,
            "min_feasible": self.min_feasible, "stats": dict(self.stats),
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }
