"""Greedy bit dropping and the shared repair moves; exhaustive enumeration's limits."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from allocator import Budget, CostTable
from allocator.core.errors import InvalidParameterError
from allocator.core.plan import check_plan
from allocator.core.result import SolveStatus
from allocator.core.synth import synth_table
from allocator.testing._cases import KNOWN_ANSWER_CASES
from solvers._brute_force import BruteForceSolver
from solvers._greedy import GreedySolver, Knapsack, shrink_to_fit, spend_leftover

NON_CONVEX = next(c for c in KNOWN_ANSWER_CASES if c.name == "non_convex")


def test_greedy_is_a_heuristic_on_non_convex_points() -> None:
    """Optimum 10 (a int4, b int2); dropping by Δcost/Δsize lands on 12, refilling on 11."""
    table = NON_CONVEX.make_table()
    plain = GreedySolver(refill=False).solve(table, NON_CONVEX.budget)
    refill = GreedySolver().solve(table, NON_CONVEX.budget)
    assert plain.objective == 12.0 and refill.objective == 11.0
    assert plain.status is refill.status is SolveStatus.FEASIBLE


def test_greedy_leaves_no_improving_single_move() -> None:
    table = synth_table(n_units=700, n_options=6, seed=9, ties=True)
    budget = Budget(bpw=3.3)
    r = GreedySolver().solve(table, budget)
    assert r.plan is not None and check_plan(r.plan, table, budget) == []
    p = solvers.build_problem(table, budget)
    slot = {str(label): j for j, label in enumerate(p.labels)}
    choice = np.empty(p.n_items, dtype=np.int64)
    choice[p.item_of_unit] = [slot[r.plan.choice[u]] for u in table.units]
    rows = np.arange(p.n_items)
    room = p.cap - p.totals(choice)[1]
    cheaper = p.cost < p.cost[rows, choice][:, None]
    fits = p.size - p.size[rows, choice][:, None] <= room
    assert not (cheaper & fits).any()
    opt = solvers.solve(table, budget, solver="mckp")
    assert opt.objective is not None and r.objective is not None
    assert opt.objective <= r.objective <= opt.objective * 1.01


def test_shrink_and_spend_on_two_constraints() -> None:
    table = synth_table(n_units=60, n_options=5, seed=3, resources=True)
    lo = table.df.groupby("unit")["bops"].min().sum()
    hi = table.df.groupby("unit")["bops"].max().sum()
    budget = Budget(bpw=3.2, max={"bops": float(lo + 0.25 * (hi - lo))})
    p = solvers.build_problem(table, budget)
    ks = Knapsack.from_problem(p)
    start = np.argmax(np.where(p.valid, p.size, -np.inf), axis=1)
    assert max(ks.used(start)) > 1  # starts over both caps
    fitted = shrink_to_fit(ks, start)
    assert fitted is not None and max(ks.used(fitted)) <= 1 + 1e-12
    spent = spend_leftover(ks, fitted)
    assert max(ks.used(spent)) <= 1 + 1e-12
    assert p.totals(spent)[0] <= p.totals(fitted)[0]


def test_greedy_stuck_between_caps_says_so() -> None:
    # int2 is small but costly in bops, int4 the reverse: each cap alone can be met, not both
    t = CostTable.from_unit_costs(units=["a"], params=[128],
                                  options=["int2-g128-asym", "int4-g128-asym"], cost=[[1.0, 0.0]],
                                  resources={"bops": [[10.0, 1.0]]})
    budget = Budget(bpw=2.3, max={"bops": 5.0})
    r = GreedySolver().solve(t, budget)
    assert r.status is SolveStatus.ERROR and "stuck between resource caps" in r.message
    assert solvers.solve(t, budget).status is SolveStatus.INFEASIBLE  # the exact answer


def test_brute_force_refuses_large_problems_naming_the_size() -> None:
    table = synth_table(n_units=12, n_options=7, seed=0)
    with pytest.raises(InvalidParameterError, match=r"1\.38e\+10 combinations \(12 units\)"):
        BruteForceSolver().solve(table, Budget(bpw=4.0))
    r = BruteForceSolver(max_combinations=10**11).solve(synth_table(n_units=4, seed=0),
                                                      Budget(bpw=4.0))
    assert r.status is SolveStatus.OPTIMAL and r.stats["combinations"] == 7.0**4


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_brute_force_validates_its_limit(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="'max_combinations' parameter"):
        BruteForceSolver(max_combinations=bad)  # type: ignore[arg-type]
