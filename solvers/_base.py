"""The solver contract: one abstract method, capability flags, and the central plan check."""

from __future__ import annotations

import abc
import importlib.util
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from allocator.core.budget import CAP_ATOL, SIZE_RTOL, Budget
from allocator.core.errors import AllocatorError, SolverUnavailableError
from allocator.core.plan import BitPlan, SolverInfo, check_rows
from allocator.core.result import SolveResult, SolveStatus
from allocator.core.table import CostTable
from solvers._problem import Problem, build_problem

__all__ = ["BaseSolver", "RawSolution", "SolverCapabilities", "relative_gap"]


@dataclass(frozen=True, kw_only=True)
class SolverCapabilities:
    """What a solver can do; tests and the CLI read these instead of solver names."""

    exact: bool = False  #: certifies optimality (status ``optimal`` means proven)
    multi_resource: bool = False  #: honours caps on extra resource columns
    ties: bool = True  #: honours tie groups (all solvers do, via :class:`Problem`)
    frontier: bool = False  #: offers ``frontier(table)``
    needs_evaluator: bool = False  #: evaluates real models (search); not a table-only solver


@dataclass(frozen=True, kw_only=True)
class RawSolution:
    """What :meth:`BaseSolver._solve` returns: a slot per item plus what the solver proved."""

    status: SolveStatus
    choice: np.ndarray | None = None
    bound: float | None = None
    message: str = ""
    stats: Mapping[str, float] = field(default_factory=dict)


def relative_gap(objective: float, bound: float | None) -> float | None:
    """(objective − bound) / max(|objective|, 1e-12), clipped at 0; ``None`` without a bound."""
    if bound is None or not math.isfinite(bound):
        return None
    return max(0.0, (objective - bound) / max(abs(objective), 1e-12))


class BaseSolver(abc.ABC):
    """Turns a :class:`~allocator.CostTable` and a :class:`~allocator.Budget` into a plan.

    Subclasses implement :meth:`_solve` on the dense :class:`~solvers._problem.Problem` (ties
    already collapsed, disallowed slots ``inf``). :meth:`solve` does the rest for everyone:
    the infeasibility pre-check with the smallest feasible budget, plan building, and the
    central check — a backend that claims success while breaking a cap yields ``error``.
    Configuration goes to the constructor as keyword-only arguments (stored, never mutated).
    """

    name: ClassVar[str]
    capabilities: ClassVar[SolverCapabilities] = SolverCapabilities()
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ()
    INSTALL_HINT: ClassVar[str] = "pip install 'bitalloc[solvers]'"

    @classmethod
    def is_available(cls) -> bool:
        """True when every optional module the solver needs is importable (nothing imported)."""
        return all(importlib.util.find_spec(m) is not None for m in cls.REQUIRED_MODULES)

    @classmethod
    def require(cls) -> None:
        if not cls.is_available():
            missing = [m for m in cls.REQUIRED_MODULES if importlib.util.find_spec(m) is None]
            raise SolverUnavailableError(
                f"solver {cls.name!r} needs {', '.join(missing)}: {cls.INSTALL_HINT}"
            )

    def params(self) -> dict[str, Any]:
        """Constructor settings, recorded in the plan."""
        return {k.lstrip("_"): v for k, v in vars(self).items() if not k.startswith("__")}

    def solve(self, table: CostTable, budget: Budget, *, seed: int | None = None) -> SolveResult:
        """Solve ``table`` under ``budget``; never raises for infeasible budgets."""
        self.require()
        t0 = time.perf_counter()
        problem = build_problem(table, budget)
        infeasible = self._precheck(problem)
        if infeasible is not None:
            return _finish(infeasible, self.name, time.perf_counter() - t0)
        try:
            raw = self._solve(problem, seed=seed)
        except AllocatorError:
            raise  # user errors (bad parameters, missing backends) are not solve outcomes
        except (ArithmeticError, RuntimeError, ValueError) as exc:
            return SolveResult(status=SolveStatus.ERROR, solver=self.name,
                               seconds=time.perf_counter() - t0, message=f"{type(exc).__name__}: {exc}")
        return self._result(problem, raw, time.perf_counter() - t0)

    @abc.abstractmethod
    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        """Choose one valid slot per item with Σ size ≤ cap (and resource caps if supported)."""

    # -------------------------------------------------------------- shared steps
    def _precheck(self, problem: Problem) -> SolveResult | None:
        if not problem.valid.any(axis=1).all():
            return SolveResult(status=SolveStatus.INFEASIBLE, solver=self.name,
                               message="some unit has no option the budget allows")
        smallest = problem.min_size()
        if smallest > problem.cap * (1 + SIZE_RTOL):
            total = problem.table.total_params
            need = problem.budget.primary_value(smallest, total)
            key, have = problem.budget.primary
            return SolveResult(
                status=SolveStatus.INFEASIBLE, solver=self.name, min_feasible=need,
                message=f"budget {key}={have:.6g} is below the smallest feasible {key}={need:.6g}",
            )
        for name, cap in problem.caps.items():
            least = float(np.where(problem.valid, problem.resources[name], np.inf).min(axis=1).sum())
            if least > cap * (1 + SIZE_RTOL) + CAP_ATOL:
                return SolveResult(
                    status=SolveStatus.INFEASIBLE, solver=self.name,
                    message=f"cap {name}={cap:.6g} is below the smallest achievable {least:.6g}",
                )
        if problem.caps and not self.capabilities.multi_resource:
            return SolveResult(
                status=SolveStatus.ERROR, solver=self.name,
                message=f"solver {self.name!r} cannot honour resource caps {sorted(problem.caps)}; "
                "use 'mckp' or 'ilp'",
            )
        return None

    def _result(self, problem: Problem, raw: RawSolution, seconds: float) -> SolveResult:
        if raw.choice is None or not raw.status.has_plan:
            return SolveResult(status=raw.status, solver=self.name, seconds=seconds,
                               message=raw.message, bound=raw.bound, stats=dict(raw.stats))
        choice = np.asarray(raw.choice, dtype=np.int64)
        if choice.shape != (problem.n_items,) or choice.min() < 0 or choice.max() >= problem.n_slots \
                or not problem.valid[np.arange(problem.n_items), choice].all():
            return SolveResult(status=SolveStatus.ERROR, solver=self.name, seconds=seconds,
                               message="solver returned a choice outside the allowed options")
        rows = problem.rows_for(choice)
        problems = check_rows(problem.table, rows, problem.budget)
        if problems:
            return SolveResult(status=SolveStatus.ERROR, solver=self.name, seconds=seconds,
                               message="plan check failed: " + "; ".join(problems[:3]))
        objective, _, _ = problem.totals(choice)
        gap = 0.0 if raw.status is SolveStatus.OPTIMAL and raw.bound is None else relative_gap(
            objective, raw.bound)
        info = SolverInfo(name=self.name, status=str(raw.status), gap=gap, seconds=seconds,
                          params=self.params())
        plan = BitPlan.from_rows(problem.table, rows, budget=problem.budget, solver=info)
        return SolveResult(status=raw.status, solver=self.name, plan=plan, objective=objective,
                           bound=raw.bound, gap=gap, seconds=seconds, message=raw.message,
                           stats=dict(raw.stats))


def _finish(result: SolveResult, name: str, seconds: float) -> SolveResult:
    return SolveResult(status=result.status, solver=name, seconds=seconds, message=result.message,
                       min_feasible=result.min_feasible)
