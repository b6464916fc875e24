"""The PuLP ILP solver: model shape, backends, limits, and the guards against over-cap plans."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import solvers
from allocator import Budget
from allocator.core.errors import InvalidParameterError
from allocator.core.plan import check_plan
from allocator.core.result import SolveStatus
from allocator.core.synth import synth_table
from solvers import _ilp
from solvers._ilp import STATUS_MAP, IlpSolver

pytest.importorskip("pulp")
needs_highs = pytest.mark.skipif(importlib.util.find_spec("highspy") is None,
                                 reason="needs highspy")


@pytest.fixture(scope="module")
def table() -> Any:
    return synth_table(n_units=140, n_options=5, seed=7, ties=True, resources=True)


def _bops_cap(table: Any, share: float) -> float:
    lo = table.df.groupby("unit")["bops"].min().sum()
    hi = table.df.groupby("unit")["bops"].max().sum()
    return float(lo + share * (hi - lo))


def test_matches_mckp_with_ties_and_caps(table: Any) -> None:
    budget = Budget(bpw=3.6, max={"bops": _bops_cap(table, 0.4)})
    ilp = IlpSolver().solve(table, budget)
    ref = solvers.solve(table, budget, solver="mckp")
    assert ilp.status is SolveStatus.OPTIMAL and ref.status is SolveStatus.OPTIMAL
    assert ilp.objective == pytest.approx(ref.objective, rel=1e-7)
    assert ilp.plan is not None and check_plan(ilp.plan, table, budget) == []
    assert ilp.plan.solver.params["backend"] == "cbc"


@needs_highs
def test_highs_backend_agrees_and_reports_its_bound(table: Any) -> None:
    budget = Budget(bpw=3.3, max={"bops": _bops_cap(table, 0.5)})
    cbc = IlpSolver(backend="cbc").solve(table, budget)
    highs = IlpSolver(backend="highs").solve(table, budget)
    assert highs.status is SolveStatus.OPTIMAL
    assert highs.objective == pytest.approx(cbc.objective, rel=1e-7)
    assert highs.objective is not None and highs.bound is not None
    assert highs.bound <= highs.objective * (1 + 1e-9)
    assert highs.gap is not None and highs.gap <= 1e-6


def test_restricted_slots_get_no_variable(table: Any) -> None:
    budget = Budget(bpw=4.0, max_bits=4)
    r = IlpSolver().solve(table, budget)
    p = solvers.build_problem(table, budget)
    assert r.stats["variables"] == int(p.valid.sum()) < p.valid.size
    assert r.stats["constraints"] == p.n_items + 1  # one choice row per item + the size row
    assert r.plan is not None and max(a.bits for a in r.plan.assignments.values()) <= 4


def test_loose_gap_reports_a_proven_bound(table: Any) -> None:
    budget = Budget(bpw=3.5)
    exact = IlpSolver().solve(table, budget)
    loose = IlpSolver(mip_gap=0.05).solve(table, budget)
    assert exact.objective is not None and loose.objective is not None
    assert loose.bound is not None and loose.bound <= exact.objective * (1 + 1e-9)
    assert loose.objective >= exact.objective * (1 - 1e-9)


def test_time_limit_never_returns_a_broken_plan() -> None:
    big = synth_table(n_units=1500, n_options=7, seed=1, resources=True)
    budget = Budget(bpw=3.3, max={"bops": _bops_cap(big, 0.3)})
    r = IlpSolver(time_limit_s=0.05).solve(big, budget)
    assert r.status in (SolveStatus.TIME_LIMIT, SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)
    if r.plan is not None:
        assert check_plan(r.plan, big, budget) == []
        if r.status is not SolveStatus.OPTIMAL:
            assert r.bound is not None and r.bound <= r.objective  # type: ignore[operator]


def _largest(problem: solvers.Problem) -> np.ndarray:
    return np.argmax(np.where(problem.valid, problem.size, -np.inf), axis=1)


def test_central_check_turns_an_over_budget_plan_into_error(
        table: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that claims optimal for an over-budget plan, past the solver's own guard."""

    def lying_solve(self: Any, cfg: Any, time_limit: float, shrink: Any) -> Any:
        return SolveStatus.OPTIMAL, _largest(self.problem), None

    monkeypatch.setattr(_ilp._Model, "solve", lying_solve)
    monkeypatch.setattr(_ilp._Model, "excess", lambda self, choice: np.zeros(len(self.rows)))
    r = IlpSolver().solve(table, Budget(bpw=3.0))
    assert r.status is SolveStatus.ERROR and r.plan is None
    assert "plan check failed" in r.message and "exceeds the cap" in r.message


def test_overshoot_within_backend_tolerance_is_retightened(
        table: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's plan overshoots by 1e-8 (its tolerance, above the check's 1e-9) once."""
    shrinks: list[np.ndarray] = []
    real_solve, real_excess = _ilp._Model.solve, _ilp._Model.excess

    def recording_solve(self: Any, cfg: Any, time_limit: float, shrink: Any) -> Any:
        shrinks.append(shrink.copy())
        return real_solve(self, cfg, time_limit, shrink)

    def first_overshoots(self: Any, choice: Any) -> Any:
        return np.full(len(self.rows), 1e-8) if len(shrinks) == 1 else real_excess(self, choice)

    monkeypatch.setattr(_ilp._Model, "solve", recording_solve)
    monkeypatch.setattr(_ilp._Model, "excess", first_overshoots)
    budget = Budget(bpw=3.0)
    r = IlpSolver().solve(table, budget)
    assert len(shrinks) == 2 and shrinks[1][0] == pytest.approx(1e-8, rel=1e-3)
    # optimal only for the tightened row: reported as feasible with a proven bound
    assert r.status is SolveStatus.FEASIBLE and r.stats["retightened"] == 1
    assert r.bound is not None and r.plan is not None and check_plan(r.plan, table, budget) == []


def test_tightened_model_without_solution_is_an_error_not_infeasible(
        table: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _ilp._Model.solve
    calls: list[int] = []

    def first_overshoots_a_lot(self: Any, cfg: Any, time_limit: float, shrink: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            return SolveStatus.OPTIMAL, _largest(self.problem), None
        return real(self, cfg, time_limit, shrink)

    monkeypatch.setattr(_ilp._Model, "solve", first_overshoots_a_lot)
    r = IlpSolver().solve(table, Budget(bpw=3.0))
    assert r.status is SolveStatus.ERROR and "tightened model gave infeasible" in r.message


def test_backend_that_keeps_overshooting_is_an_error(
        table: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ilp._Model, "solve", lambda self, cfg, tl, shrink: (
        SolveStatus.OPTIMAL, _largest(self.problem), None))
    r = IlpSolver().solve(table, Budget(bpw=3.0))
    assert r.status is SolveStatus.ERROR and "over a cap" in r.message


def test_status_map_covers_pulp_codes() -> None:
    import pulp

    assert STATUS_MAP[(pulp.LpStatusOptimal, pulp.LpSolutionOptimal)] is SolveStatus.OPTIMAL
    assert STATUS_MAP[(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)] \
        is SolveStatus.TIME_LIMIT
    assert STATUS_MAP[(pulp.LpStatusInfeasible, pulp.LpSolutionNoSolutionFound)] \
        is SolveStatus.INFEASIBLE


@pytest.mark.parametrize("kw,name", [
    ({"backend": "gurobi"}, "backend"), ({"time_limit_s": 0}, "time_limit_s"),
    ({"time_limit_s": float("inf")}, "time_limit_s"), ({"mip_gap": 1.0}, "mip_gap"),
    ({"mip_gap": -0.1}, "mip_gap"), ({"threads": 0}, "threads"), ({"threads": True}, "threads"),
])
def test_bad_config_names_the_parameter(kw: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of IlpConfig"):
        IlpSolver(**kw)


def test_registered_with_capabilities() -> None:
    cls = solvers.solver_class("ilp")
    assert cls is IlpSolver and cls.capabilities.exact and cls.capabilities.multi_resource
    assert cls.REQUIRED_MODULES == ("pulp",)


def test_cbc_preprocessing_bug() -> None:
    """Found by the conformance oracle: CBC's preprocessing returned 2.0 as 'optimal' here."""
    import pandas as pd

    from allocator import CostTable

    rows = []
    for unit, params, tie, costs in [("u0", 512, "", (0, 2, 0)), ("u1", 512, "", (0, 0, 0)),
                                     ("u2", 256, "t1", (0, 1, 0)), ("u3", 1024, "t1", (0, 0, 0))]:
        for (option, bits), cost in zip([("int4-g128-asym", 4), ("int3-g128-asym", 3),
                                         ("int8-g128-asym", 8)], costs, strict=True):
            rows.append({"unit": unit, "params": params, "option": option, "bits": bits,
                         "size_bits": params * (bits + 0.25), "cost": float(cost), "tie": tie})
    table = CostTable(pd.DataFrame(rows))
    for backend in ("cbc", "highs"):
        res = solvers.solve(table, Budget(bpw=4.0), solver=IlpSolver(backend=backend))
        assert res.objective == pytest.approx(1.0), backend
