"""The conformance suite every solver passes (shipped, so third-party solvers can reuse it).

Subclass :class:`SolverConformance` and provide a ``solver`` fixture::

    class TestMySolver(SolverConformance):
        @pytest.fixture
        def solver(self) -> BaseSolver:
            return MySolver()

Exact solvers (``capabilities.exact``) must hit the optimum of an independent exhaustive
enumeration on 500 generated problems (ties, resource caps, per-unit restrictions); heuristics
must return a plan that passes the central check and costs no less than the optimum. Solvers
without ``multi_resource`` must answer resource caps with status ``error``; a heuristic with it
may also answer ``error`` when it gets stuck between caps (it cannot prove infeasibility).
:class:`InputValidationConformance` checks that bad tables and budgets fail with clear errors.
Needs pytest and hypothesis (the ``dev`` extra).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator.core.budget import Budget
from allocator.core.errors import InvalidBudgetError, InvalidCostTableError
from allocator.core.plan import BitPlan, check_plan
from allocator.core.result import SolveResult, SolveStatus
from allocator.core.synth import synth_table
from allocator.core.table import CostTable
from allocator.testing._cases import (
    KNOWN_ANSWER_CASES,
    KnownCase,
    Optimum,
    exhaustive_optimum,
    problems,
)

__all__ = ["InputValidationConformance", "SolverConformance", "assert_conforms", "oracle"]

_FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
_ORACLE: dict[tuple[str, str], Optimum] = {}


def oracle(table: CostTable, budget: Budget) -> Optimum:
    """:func:`exhaustive_optimum`, cached (every solver sees the same derandomized problems)."""
    key = (table.fingerprint, repr(sorted(budget.to_dict().items())))
    if key not in _ORACLE:
        _ORACLE[key] = exhaustive_optimum(table, budget)
    return _ORACLE[key]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def assert_conforms(solver: Any, table: CostTable, budget: Budget, result: SolveResult,
                    opt: Optimum) -> None:
    """Every promise of the solver contract for one result, against the enumerated optimum."""
    caps = solver.capabilities
    status = result.status
    cap = budget.size_cap_bits(table.total_params)
    if opt.n_plans == 0:  # restrictions leave some unit without an option
        assert status is SolveStatus.INFEASIBLE and result.plan is None, status
        return
    if opt.min_size_bits > cap * (1 + 1e-9):
        assert status is SolveStatus.INFEASIBLE, (status, result.message)
        want = budget.primary_value(opt.min_size_bits, table.total_params)
        assert result.min_feasible is not None and _close(result.min_feasible, want)
        return
    if budget.max and not caps.multi_resource:
        assert status in (SolveStatus.ERROR, SolveStatus.INFEASIBLE), status
        return
    if not np.isfinite(opt.cost):  # only the resource caps make it infeasible
        allowed = (SolveStatus.INFEASIBLE,) if caps.exact else (SolveStatus.INFEASIBLE,
                                                                  SolveStatus.ERROR)
        assert status in allowed, (status, result.message)
        assert result.plan is None
        return
    if caps.exact:
        assert status is SolveStatus.OPTIMAL, (status, result.message)
        assert result.objective is not None and _close(result.objective, opt.cost), \
            (result.objective, opt.cost)
    elif status is SolveStatus.ERROR and budget.max:
        return  # a heuristic stuck between caps says so; it never returns a broken plan
    else:
        assert status.has_plan, (status, result.message)
        assert result.objective is not None
        assert result.objective >= opt.cost - 1e-9 * max(1.0, abs(opt.cost)), \
            (result.objective, opt.cost)
        if status is SolveStatus.OPTIMAL:
            assert _close(result.objective, opt.cost), (result.objective, opt.cost)
    assert result.plan is not None
    assert check_plan(result.plan, table, budget) == []
    assert _close(result.plan.summary.predicted_cost, result.objective)
    if result.bound is not None:
        assert result.bound <= opt.cost + 1e-9 * max(1.0, abs(opt.cost))
    if result.gap is not None:
        assert result.gap >= 0


class SolverConformance:
    """Tests every solver passes; subclasses provide the ``solver`` fixture."""

    @pytest.fixture
    def solver(self) -> Any:
        raise NotImplementedError("subclasses provide a 'solver' fixture")

    # ------------------------------------------------------------ known answers
    @pytest.mark.parametrize("case", KNOWN_ANSWER_CASES, ids=lambda c: c.name)
    def test_known_answer(self, solver: Any, case: KnownCase) -> None:
        """Property: hand-derived optima are met (exact) or bounded from above (heuristic)."""
        table = case.make_table()
        result = solver.solve(table, case.budget, seed=0)
        opt = oracle(table, case.budget)
        if case.optimum is None:
            assert not np.isfinite(opt.cost)
            assert result.status is SolveStatus.INFEASIBLE
            assert result.min_feasible == pytest.approx(case.min_feasible, rel=1e-12)
            return
        assert opt.cost == pytest.approx(case.optimum)  # the derivation agrees with enumeration
        assert_conforms(solver, table, case.budget, result, opt)
        exact_plan = solver.capabilities.exact or result.status is SolveStatus.OPTIMAL
        if case.choice is not None and exact_plan and result.plan is not None:
            assert result.plan.choice == case.choice

    # ------------------------------------------------------------ the oracle
    @settings(max_examples=500, suppress_health_check=_FIXTURE_OK)
    @given(problem=problems())
    def test_exact_matches_enumeration(self, solver: Any,
                                       problem: tuple[CostTable, Budget]) -> None:
        """Property: an exact solver's objective equals exhaustive enumeration's."""
        if not solver.capabilities.exact:
            pytest.skip("not an exact solver")
        table, budget = problem
        assert_conforms(solver, table, budget, solver.solve(table, budget, seed=0),
                        oracle(table, budget))

    @settings(max_examples=150, suppress_health_check=_FIXTURE_OK)
    @given(problem=problems())
    def test_heuristic_feasible_and_not_below_optimum(
            self, solver: Any, problem: tuple[CostTable, Budget]) -> None:
        """Property: a heuristic's plan passes the central check and costs ≥ the optimum."""
        if solver.capabilities.exact or solver.capabilities.needs_evaluator:
            pytest.skip("exact solvers are held to the optimum; search solvers run fewer cases")
        table, budget = problem
        assert_conforms(solver, table, budget, solver.solve(table, budget, seed=0),
                        oracle(table, budget))

    @settings(max_examples=12, suppress_health_check=_FIXTURE_OK)
    @given(problem=problems(max_units=4, max_options=3, caps=False))
    def test_search_solver_feasible(self, solver: Any, problem: tuple[CostTable, Budget]) -> None:
        """Property: a search solver (real evaluations in the loop) returns a valid plan."""
        if not solver.capabilities.needs_evaluator:
            pytest.skip("not a search solver")
        table, budget = problem
        assert_conforms(solver, table, budget, solver.solve(table, budget, seed=0),
                        oracle(table, budget))

    # ------------------------------------------------------------ metamorphic checks
    @settings(max_examples=60, suppress_health_check=_FIXTURE_OK)
    @given(problem=problems(), looser=st.floats(1.0, 2.0))
    def test_looser_budget_never_worse(self, solver: Any, problem: tuple[CostTable, Budget],
                                       looser: float) -> None:
        """Property: an exact solver's optimum does not rise when the budget grows."""
        if not solver.capabilities.exact:
            pytest.skip("only exact solvers promise monotonicity")
        table, budget = problem
        bigger = budget.with_size_bits(budget.size_cap_bits(table.total_params) * looser,
                                       table.total_params)
        a, b = solver.solve(table, budget, seed=0), solver.solve(table, bigger, seed=0)
        if a.status is SolveStatus.OPTIMAL:
            assert b.status is SolveStatus.OPTIMAL
            assert b.objective is not None and a.objective is not None
            assert b.objective <= a.objective + 1e-9 * max(1.0, abs(a.objective))

    @settings(max_examples=40, suppress_health_check=_FIXTURE_OK)
    @given(problem=problems(), scale=st.sampled_from([0.001, 3.0, 1e4]))
    def test_scaling_costs_scales_optimum(self, solver: Any, problem: tuple[CostTable, Budget],
                                          scale: float) -> None:
        """Property: multiplying every cost by c > 0 multiplies an exact optimum by c."""
        if not solver.capabilities.exact:
            pytest.skip("only exact solvers promise it")
        table, budget = problem
        scaled = CostTable(table.df.assign(cost=table.df["cost"] * scale))
        a, b = solver.solve(table, budget, seed=0), solver.solve(scaled, budget, seed=0)
        assert a.status is b.status
        if a.objective is not None:
            assert b.objective == pytest.approx(a.objective * scale, rel=1e-9, abs=1e-9)

    def test_same_result_twice(self, solver: Any) -> None:
        """Property: solving the same problem twice (same seed) gives the same plan."""
        table = synth_table(n_units=14, n_options=4, seed=3, ties=True)
        budget = Budget(bpw=3.6)
        a, b = solver.solve(table, budget, seed=0), solver.solve(table, budget, seed=0)
        assert a.status is b.status and a.status.has_plan, a.message
        assert a.plan is not None and b.plan is not None and a.plan.choice == b.plan.choice
        assert a.objective == b.objective
        assert check_plan(a.plan, table, budget) == []

    def test_infeasible_budget_reports_smallest(self, solver: Any) -> None:
        """Property: below the smallest plan → ``infeasible`` with that plan's budget."""
        table = synth_table(n_units=14, n_options=3, seed=1)
        smallest = table.df.groupby("unit")["size_bits"].min().sum()
        for budget, want in ((Budget(bpw=1.0), smallest / table.total_params),
                             (Budget(size_bytes=smallest / 8 * 0.99), smallest / 8)):
            r = solver.solve(table, budget, seed=0)
            assert r.status is SolveStatus.INFEASIBLE and r.plan is None
            assert r.min_feasible == pytest.approx(want, rel=1e-12)
            assert "smallest feasible" in r.message

    def test_unknown_cap_column_is_a_clear_error(self, solver: Any) -> None:
        table = KNOWN_ANSWER_CASES[0].make_table()
        with pytest.raises(InvalidBudgetError, match="'latency_us'"):
            solver.solve(table, Budget(bpw=4.0, max={"latency_us": 1.0}), seed=0)

    def test_plan_json_round_trip(self, solver: Any) -> None:
        case = KNOWN_ANSWER_CASES[0]
        table = case.make_table()
        r = solver.solve(table, case.budget, seed=0)
        assert r.plan is not None
        again = BitPlan.from_dict(r.plan.to_dict())
        assert again == r.plan and check_plan(again, table, case.budget) == []
        assert again.solver.name == solver.name and again.solver.status == str(r.status)


def _frame(**overrides: Any) -> pd.DataFrame:
    df = pd.DataFrame({"unit": ["a", "a", "b", "b"], "params": [128] * 4,
                       "option": ["int2-g128-asym", "int4-g128-asym"] * 2, "bits": [2, 4, 2, 4],
                       "size_bits": [288.0, 544.0, 288.0, 544.0], "cost": [4.0, 1.0, 9.0, 1.0]})
    for col, (row, value) in overrides.items():
        df[col] = df[col].astype(object)
        df.loc[row, col] = value
    return df


#: (id, DataFrame, regex the error message must match)
BAD_TABLES: tuple[tuple[str, Any, str], ...] = (
    ("nan_cost", lambda: _frame(cost=(1, float("nan"))), r"'cost'.*row 1 \(a, int4"),
    ("inf_cost", lambda: _frame(cost=(2, float("inf"))), r"'cost'.*row 2 \(b, int2"),
    ("negative_cost", lambda: _frame(cost=(0, -1.0)), r"'cost' must be finite and ≥ 0"),
    ("duplicate_pair", lambda: _frame(option=(1, "int2-g128-asym")),
     r"duplicate \(unit, option\).*row 1 \(a, int2"),
    ("missing_column", lambda: _frame().drop(columns="size_bits"), r"missing column.*size_bits"),
    ("inconsistent_params", lambda: _frame(params=(3, 256)), r"inconsistent 'params'.*row"),
    ("tie_option_sets", lambda: _frame().assign(tie="g").drop(index=3),
     r"tie group 'g' has units with different option sets"),
)


class InputValidationConformance:
    """Bad tables and budgets fail before any solver runs, with one clear line."""

    @pytest.mark.parametrize("make,pattern", [b[1:] for b in BAD_TABLES],
                             ids=[b[0] for b in BAD_TABLES])
    def test_bad_table_is_rejected(self, make: Any, pattern: str) -> None:
        with pytest.raises(InvalidCostTableError, match=pattern) as err:
            CostTable(make())
        assert "\n" not in str(err.value)

    @pytest.mark.parametrize("kw,pattern", [
        ({}, "exactly one primary cap"), ({"bpw": 3.0, "size_bytes": 1.0}, "exactly one"),
        ({"bpw": -1.0}, "bpw must be"), ({"bpw": float("nan")}, "bpw must be"),
        ({"bpw": 3.0, "max": {"bops": -1.0}}, "max\\['bops'\\]"),
        ({"bpw": 3.0, "min_bits": 5.0, "max_bits": 4.0}, "exceeds max_bits"),
    ])
    def test_bad_budget_is_rejected(self, kw: dict[str, Any], pattern: str) -> None:
        with pytest.raises(InvalidBudgetError, match=pattern):
            Budget(**kw)
