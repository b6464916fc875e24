"""The multiple-choice knapsack as an integer programme, solved by PuLP (CBC or HiGHS).

Model (methods.md, "Allocation problems"; HAWQ-V3's ILP): a binary ``x_ij`` for every *valid*
slot ``j`` of item ``i`` (tie groups are already one item; slots a restriction forbids simply have
no variable), and

    minimise   Σ_ij cost_ij · x_ij
    subject to Σ_j x_ij = 1                      for every item i
               Σ_ij size_ij · x_ij ≤ S           (primary budget)
               Σ_ij res_kij · x_ij ≤ R_k         (every resource cap k)

Rows are scaled by their right-hand side and the objective by its largest coefficient, so the
backend's absolute tolerances act as relative ones. A backend may still accept a solution that
overshoots a cap by its feasibility tolerance (≈1e-7 relative, more than the 1e-9 the central plan
check allows); the solver then tightens that row by the overshoot and solves again (at most
:data:`_RETIGHTEN` times) instead of returning an over-budget plan.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from allocator.core.budget import SIZE_RTOL
from allocator.core.errors import InvalidParameterError, SolverUnavailableError
from allocator.core.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._hull import lagrangian_value, lower_hulls, lp_greedy
from solvers._problem import Problem
from solvers._tolerances import CAP_RTOL, ZERO_CAP

__all__ = ["STATUS_MAP", "IlpBackend", "IlpConfig", "IlpSolver"]

#: Re-solves with a tightened row when the backend's tolerance let a cap slip.
_RETIGHTEN = 3


class IlpBackend(StrEnum):
    """MIP backend behind PuLP."""

    CBC = "cbc"  #: COIN-OR CBC, bundled with PuLP (a subprocess per solve)
    HIGHS = "highs"  #: HiGHS in-process through ``highspy`` (reports its dual bound)


#: PuLP (``LpProblem.status``, ``LpProblem.sol_status``) → our status. A solution that is integer
#: feasible but not proven optimal only arises from a limit (time, nodes), hence TIME_LIMIT;
#: CBC's presolve proves infeasibility without any solution (-1, 0). Unknown pairs → ERROR.
STATUS_MAP: dict[tuple[int, int], SolveStatus] = {
    (1, 1): SolveStatus.OPTIMAL,  # LpStatusOptimal, LpSolutionOptimal
    (1, 2): SolveStatus.TIME_LIMIT,  # LpStatusOptimal, LpSolutionIntegerFeasible (limit hit)
    (0, 0): SolveStatus.TIME_LIMIT,  # LpStatusNotSolved, no solution before the limit
    (0, 2): SolveStatus.TIME_LIMIT,  # LpStatusNotSolved with an incumbent
    (-1, -1): SolveStatus.INFEASIBLE,  # LpStatusInfeasible, LpSolutionInfeasible
    (-1, 0): SolveStatus.INFEASIBLE,  # LpStatusInfeasible, no solution (presolve proof)
    (-2, -2): SolveStatus.ERROR,  # unbounded: impossible with binaries, so a modelling bug
    (-3, 0): SolveStatus.ERROR,  # LpStatusUndefined
}


@dataclass(frozen=True, kw_only=True)
class IlpConfig:
    """Settings of :class:`IlpSolver`.

    Attributes:
        backend: ``cbc`` (default, bundled with PuLP) or ``highs`` (needs ``highspy``).
        time_limit_s: wall-clock limit handed to the backend.
        mip_gap: relative gap at which the backend stops and reports optimal.
        threads: backend threads (``None`` = backend default; 1 keeps CBC deterministic).
        msg: let the backend print its log.
    """

    backend: IlpBackend = IlpBackend.CBC
    time_limit_s: float = 60.0
    mip_gap: float = 1e-9
    threads: int | None = 1
    msg: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", _backend(self.backend))
        t = self.time_limit_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise InvalidParameterError(
                "The 'time_limit_s' parameter of IlpConfig must be a float in the range "
                f"(0, inf). Got {t!r} instead.")
        g = self.mip_gap
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g < 1:
            raise InvalidParameterError(
                f"The 'mip_gap' parameter of IlpConfig must be a float in the range [0, 1). "
                f"Got {g!r} instead.")
        n = self.threads
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidParameterError(
                f"The 'threads' parameter of IlpConfig must be an int ≥ 1 or None. "
                f"Got {n!r} instead.")


def _backend(value: IlpBackend | str) -> IlpBackend:
    try:
        return IlpBackend(value)
    except ValueError:
        raise InvalidParameterError(
            "The 'backend' parameter of IlpConfig must be one of "
            f"{[b.value for b in IlpBackend]}. Got {value!r} instead.") from None


class IlpSolver(BaseSolver):
    """Exact MCKP by integer programming with PuLP (see the module docstring).

    Example:
        >>> from allocator import Budget, CostTable
        >>> t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
        ...     options=["int2-g128-asym", "int4-g128-asym"], cost=[[4.0, 1.0], [9.0, 1.0]])
        >>> r = IlpSolver().solve(t, Budget(bpw=3.25))
        >>> r.status.value, r.objective
        ('optimal', 5.0)
    """

    name = "ilp"
    capabilities = SolverCapabilities(exact=True, multi_resource=True)
    REQUIRED_MODULES = ("pulp",)
    INSTALL_HINT = "pip install pulp (and 'bitalloc[solvers]' for the highs backend)"

    def __init__(self, *, backend: IlpBackend | str = IlpBackend.CBC, time_limit_s: float = 60.0,
                 mip_gap: float = 1e-9, threads: int | None = 1, msg: bool = False) -> None:
        self._config = IlpConfig(backend=_backend(backend), time_limit_s=time_limit_s,
                                 mip_gap=mip_gap, threads=threads, msg=msg)
        highs = self._config.backend is IlpBackend.HIGHS
        if highs and importlib.util.find_spec("highspy") is None:
            raise SolverUnavailableError(
                "ilp backend 'highs' needs highspy: pip install highspy (or backend='cbc')")

    @property
    def config(self) -> IlpConfig:
        return self._config

    def params(self) -> dict[str, Any]:
        return {**asdict(self._config), "backend": str(self._config.backend)}

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        model = _Model(problem)
        if model.empty_item:
            return RawSolution(status=SolveStatus.INFEASIBLE,
                               message="a zero resource cap leaves some unit without an option")
        t0 = time.perf_counter()
        stats: dict[str, float] = {"variables": float(model.n_vars),
                                   "constraints": float(problem.n_items + len(model.rows))}
        shrink = excess = np.zeros(len(model.rows))
        for attempt in range(_RETIGHTEN + 1):
            remaining = self._config.time_limit_s - (time.perf_counter() - t0)
            if remaining <= 0:
                return RawSolution(status=SolveStatus.TIME_LIMIT, stats=stats,
                                   message="time limit reached while re-tightening caps")
            status, choice, bound = model.solve(self._config, remaining, shrink)
            stats["retightened"] = float(attempt)
            if choice is None and attempt > 0:  # no proof about the original problem
                return RawSolution(status=SolveStatus.ERROR, stats=stats, message=(
                    f"{self._config.backend} broke a cap by {excess.max():.3g} (relative) and "
                    f"the tightened model gave {status}"))
            if choice is None:
                return RawSolution(status=status, bound=bound, stats=stats,
                                   message=f"{self._config.backend} reported {status}")
            excess = model.excess(choice)
            if not np.any(excess > 0):
                break
            shrink += excess + CAP_RTOL  # rows are scaled to rhs 1: excess is relative
        else:
            return RawSolution(status=SolveStatus.ERROR, stats=stats,
                               message="backend kept returning plans over a cap")
        if attempt > 0:
            # optimal for the tightened rows only: neither the status nor the backend's bound
            # carries over to the original problem
            status, bound = SolveStatus.FEASIBLE, None
        if bound is None and (status is not SolveStatus.OPTIMAL or self._config.mip_gap > 1e-6):
            bound = _lagrangian_bound(problem)
        msg = "" if status is SolveStatus.OPTIMAL else f"{self._config.backend} stopped: {status}"
        return RawSolution(status=status, choice=choice, bound=bound, stats=stats, message=msg)


class _Model:
    """The PuLP model of a problem, built once; :meth:`solve` may re-solve with tighter rows."""

    def __init__(self, problem: Problem) -> None:
        import pulp

        self.problem = problem
        valid = problem.valid.copy()
        caps = [("size", problem.size, problem.cap)] + [
            (k, problem.resources[k], problem.caps[k]) for k in sorted(problem.caps)]
        for _, mat, cap in caps:
            if cap <= ZERO_CAP:  # a zero cap forbids every slot that uses the resource at all
                valid &= ~(mat > 0)
        self.empty_item = not valid.any(axis=1).all()
        self.item, self.slot = np.nonzero(valid)
        self.n_vars = len(self.item)
        names = [f"x_{i}_{j}" for i, j in zip(self.item.tolist(), self.slot.tolist(), strict=True)]
        self.x = [pulp.LpVariable(n, cat=pulp.LpBinary) for n in names]
        self.lp = pulp.LpProblem("bitalloc", pulp.LpMinimize)
        cost = problem.cost[self.item, self.slot]
        self.obj_scale = float(max(np.abs(cost).max(initial=0.0), 1e-300))
        self.lp.setObjective(pulp.LpAffineExpression(zip(self.x, (cost / self.obj_scale).tolist(),
                                                         strict=True)))
        bounds = np.flatnonzero(np.diff(self.item)) + 1
        starts, ends = np.r_[0, bounds], np.r_[bounds, self.n_vars]
        for i, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            ones = pulp.LpAffineExpression([(v, 1.0) for v in self.x[lo:hi]])
            one = pulp.LpConstraint(ones, pulp.LpConstraintEQ, rhs=1.0)
            self.lp.addConstraint(one, f"one_{i}")
        #: (name, coefficients scaled to rhs 1, cap) of every ≤ row (zero caps have none)
        self.rows: list[tuple[str, np.ndarray, float]] = []
        for name, mat, cap in caps:
            if cap > ZERO_CAP:
                self.rows.append((name, mat[self.item, self.slot] / cap, cap))
        self._cons: list[str] = []
        for r, (_, coef, _) in enumerate(self.rows):
            expr = pulp.LpAffineExpression(zip(self.x, coef.tolist(), strict=True))
            self._cons.append(f"cap_{r}")
            row = pulp.LpConstraint(expr, pulp.LpConstraintLE, rhs=1.0)
            self.lp.addConstraint(row, f"cap_{r}")

    def solve(self, cfg: IlpConfig, time_limit: float,
              shrink: np.ndarray) -> tuple[SolveStatus, np.ndarray | None, float | None]:
        import pulp

        for con, s in zip(self._cons, shrink, strict=True):
            self.lp.constraints[con].changeRHS(1.0 - float(s))
        kw: dict[str, Any] = {"msg": cfg.msg, "timeLimit": time_limit, "gapRel": cfg.mip_gap}
        if cfg.threads is not None:
            kw["threads"] = cfg.threads
        if cfg.backend is IlpBackend.HIGHS:
            solver = pulp.HiGHS(**kw)
        else:
            # CBC 2.10.3's preprocessing (the binary PuLP bundles) can fix variables wrongly and
            # report a suboptimal plan as optimal: 2.0 for a 1.0 optimum on a 3-item problem
            # (tests/solvers/test_ilp.py::test_cbc_preprocessing_bug). Off, CBC is exact.
            solver = pulp.PULP_CBC_CMD(**kw, options=["preprocess off"])
        try:
            self.lp.solve(solver)
        except pulp.PulpSolverError as exc:
            raise RuntimeError(f"{cfg.backend} failed: {exc}") from None
        status = STATUS_MAP.get((int(self.lp.status), int(self.lp.sol_status)), SolveStatus.ERROR)
        bound = self._backend_bound(cfg)
        if not status.has_plan:
            return status, None, bound
        values = np.array([v.varValue if v.varValue is not None else np.nan for v in self.x])
        if np.isnan(values).any():
            return SolveStatus.TIME_LIMIT, None, bound
        return status, self._choice(values), bound

    def _choice(self, values: np.ndarray) -> np.ndarray | None:
        """Each item's slot: its variable with the largest value (integral within tolerance)."""
        n = self.problem.n_items
        best = np.full(n, -np.inf)
        np.maximum.at(best, self.item, values)
        pick = (values == best[self.item]) & (values > 0.5)
        choice = np.full(n, -1, dtype=np.int64)
        choice[self.item[pick][::-1]] = self.slot[pick][::-1]  # first variable wins ties
        return choice if (choice >= 0).all() else None

    def _backend_bound(self, cfg: IlpConfig) -> float | None:
        if cfg.backend is not IlpBackend.HIGHS:
            return None  # CBC's bound is not exposed by PuLP
        try:
            value = float(self.lp.solverModel.getInfo().mip_dual_bound)
        except AttributeError:
            return None
        return value * self.obj_scale if math.isfinite(value) else None

    def excess(self, choice: np.ndarray) -> np.ndarray:
        """Relative overshoot of every ≤ row beyond the central check's tolerance (0 if none)."""
        p = self.problem
        i = np.arange(p.n_items)
        out = np.zeros(len(self.rows))
        for r, (name, _, cap) in enumerate(self.rows):
            mat = p.size if name == "size" else p.resources[name]
            used = float(mat[i, choice].sum())
            if used > cap * (1 + SIZE_RTOL):
                out[r] = used / cap - 1.0
        return out


def _lagrangian_bound(problem: Problem) -> float | None:
    """A proven lower bound when the backend gives none: the LP relaxation of the size row.

    Dropping the resource rows only relaxes the problem, so the bound holds with caps too.
    """
    hull = lower_hulls(problem.size, problem.cost)
    lam = lp_greedy(hull, problem.size, problem.cap).lam
    value, _ = lagrangian_value(problem.cost, [problem.size], [lam], [problem.cap])
    return value if math.isfinite(value) else None
