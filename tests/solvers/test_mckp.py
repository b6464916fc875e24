"""The exact MCKP solver against exhaustive enumeration, PuLP/CBC, and its own contract."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import solvers
from allocator import Budget, CostTable
from allocator.core.errors import InvalidParameterError
from allocator.core.plan import check_plan
from allocator.core.result import SolveStatus
from allocator.core.synth import synth_table
from solvers._mckp import MckpSolver

OPTS = ["int2-g128-asym", "int3-g128-asym", "int4-g128-asym", "int8-g128-asym", "fp16"]


def brute_force(table: CostTable, budget: Budget) -> float:
    """Least cost over every assignment that meets every cap (inf when none does).

    A zero cap forbids any use of its resource, however small (``solvers.within_cap``).
    """
    p = solvers.build_problem(table, budget)
    best = np.inf
    for ch in itertools.product(range(p.n_slots), repeat=p.n_items):
        c, s, res = p.totals(np.array(ch))
        if not np.isfinite(c) or not solvers.within_cap(s, p.cap):
            continue
        if all(solvers.within_cap(res[k], p.caps[k]) for k in p.caps):
            best = min(best, c)
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[CostTable, Budget]:
    n = draw(st.integers(1, 5))
    k = draw(st.integers(1, 4))
    opts = draw(st.permutations(OPTS))[:k]
    params = [64 * draw(st.integers(1, 40)) for _ in range(n)]
    cost = [[draw(st.floats(0, 10, allow_nan=False)) for _ in range(k)] for _ in range(n)]
    ties = draw(st.lists(st.sampled_from(["", "t1", "t2"]), min_size=n, max_size=n)) \
        if draw(st.booleans()) else None
    resources = {"bops": [[draw(st.floats(0, 100)) for _ in range(k)] for _ in range(n)]}
    table = CostTable.from_unit_costs(units=[f"u{i}" for i in range(n)], params=params,
                                      options=opts, cost=cost, tie=ties, resources=resources)
    caps = {"bops": draw(st.floats(0, 100.0 * n))} if draw(st.booleans()) else {}
    return table, Budget(bpw=draw(st.floats(2.0, 17.0)), max=caps)


@settings(max_examples=600)
@given(instances())
def test_matches_exhaustive_enumeration(inst: tuple[CostTable, Budget]) -> None:
    table, budget = inst
    best = brute_force(table, budget)
    r = MckpSolver().solve(table, budget)
    if not np.isfinite(best):
        assert r.status is SolveStatus.INFEASIBLE
        return
    assert r.status is SolveStatus.OPTIMAL, r.message
    assert r.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert r.gap is not None and r.gap <= 1e-9
    assert r.plan is not None and check_plan(r.plan, table, budget) == []


def test_known_optimum() -> None:
    # a: int2 costs 4, int4 costs 1; b: 9 vs 1. Room for one int4: give it to b.
    t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
                                  options=["int2-g128-asym", "int4-g128-asym"],
                                  cost=[[4.0, 1.0], [9.0, 1.0]])
    r = solvers.solve(t, Budget(bpw=3.25))
    assert r.status is SolveStatus.OPTIMAL and r.objective == 5.0
    assert r.plan is not None and r.plan.choice == {"a": "int2-g128-asym", "b": "int4-g128-asym"}
    # The LP takes half of a's step too (bound 5 - 1.5), the integer optimum cannot.
    r = solvers.solve(t, Budget(bpw=3.75))
    assert r.objective == 5.0


def test_non_convex_choice_beats_hull() -> None:
    # Option int3 is above the hull of (int2, int4) but is the only one that fits exactly.
    t = CostTable.from_unit_costs(units=["a"], params=[128],
                                  options=["int2-g128-asym", "int3-g128-asym", "int4-g128-asym"],
                                  cost=[[10.0, 9.0, 0.0]])
    r = solvers.solve(t, Budget(bpw=3.25))
    assert r.status is SolveStatus.OPTIMAL and r.plan is not None
    assert r.plan.choice == {"a": "int3-g128-asym"} and r.objective == 9.0


def test_looser_budget_never_worse() -> None:
    t = synth_table(n_units=300, n_options=7, seed=5, ties=True)
    values = [solvers.solve(t, Budget(bpw=b)).objective for b in np.linspace(2.3, 8.2, 12)]
    assert all(v is not None for v in values)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:], strict=False))


def test_deterministic() -> None:
    t = synth_table(n_units=2000, n_options=6, seed=2)
    a, b = (solvers.solve(t, Budget(bpw=3.7)) for _ in range(2))
    assert a.plan is not None and b.plan is not None and a.plan.choice == b.plan.choice
    assert a.objective == b.objective and a.bound == b.bound


def test_matches_cbc_on_a_realistic_table() -> None:
    pulp = pytest.importorskip("pulp")
    t = synth_table(n_units=150, n_options=7, seed=11)
    budget = Budget(bpw=3.9)
    p = solvers.build_problem(t, budget)
    m = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = {(i, j): pulp.LpVariable(f"x{i}_{j}", cat="Binary")
         for i in range(p.n_items) for j in range(p.n_slots)}
    m += pulp.lpSum(float(p.cost[i, j]) * v for (i, j), v in x.items())
    for i in range(p.n_items):
        m += pulp.lpSum(x[i, j] for j in range(p.n_slots)) == 1
    m += pulp.lpSum(float(p.size[i, j]) * v for (i, j), v in x.items()) <= p.cap
    m.solve(pulp.PULP_CBC_CMD(msg=0, gapRel=0, timeLimit=60))
    r = solvers.solve(t, budget)
    assert r.status is SolveStatus.OPTIMAL
    assert r.objective == pytest.approx(pulp.value(m.objective), rel=1e-6)


def test_infeasible_reports_min_feasible() -> None:
    t = synth_table(n_units=20, n_options=4, seed=0)
    r = solvers.solve(t, Budget(bpw=1.5))
    assert r.status is SolveStatus.INFEASIBLE and r.plan is None
    assert r.min_feasible == pytest.approx(2.25)
    assert solvers.solve(t, Budget(bpw=r.min_feasible)).status is SolveStatus.OPTIMAL


def test_joint_caps_infeasible_is_proven() -> None:
    # Each cap alone can be met, both together cannot.
    t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
                                  options=["int2-g128-asym", "int8-g128-asym"],
                                  cost=[[1.0, 0.0], [1.0, 0.0]],
                                  resources={"lat": [[5.0, 1.0], [5.0, 1.0]]})
    r = solvers.solve(t, Budget(bpw=2.25, max={"lat": 6.0}))
    assert r.status is SolveStatus.INFEASIBLE


def test_resource_cap_binds() -> None:
    t = synth_table(n_units=35, n_options=7, seed=3, resources=True)
    free = solvers.solve(t, Budget(bpw=5.0))
    assert free.plan is not None
    bops = free.plan.summary.resources["bops"]
    capped = solvers.solve(t, Budget(bpw=5.0, max={"bops": 0.9 * bops}))
    assert capped.plan is not None and capped.status.has_plan
    assert capped.plan.summary.resources["bops"] <= 0.9 * bops * (1 + 1e-9)
    assert capped.objective is not None and free.objective is not None
    assert capped.objective >= free.objective
    assert capped.gap is not None and capped.bound is not None


def test_limits_give_feasible_with_gap() -> None:
    t = synth_table(n_units=3000, n_options=7, seed=4)
    budget = Budget(bpw=3.3)
    exact = solvers.solve(t, budget)
    limited = MckpSolver(max_states=1, first_core=1).solve(t, budget)
    assert limited.status in (SolveStatus.FEASIBLE, SolveStatus.OPTIMAL)
    assert limited.plan is not None and check_plan(limited.plan, t, budget) == []
    assert limited.objective is not None and exact.objective is not None
    assert limited.objective >= exact.objective * (1 - 1e-12)
    assert limited.bound is not None and limited.bound <= exact.objective * (1 + 1e-12)
    if limited.status is SolveStatus.FEASIBLE:
        assert limited.gap is not None and limited.gap > 0


def test_budget_does_not_bind() -> None:
    t = synth_table(n_units=30, n_options=8, seed=0)
    r = solvers.solve(t, Budget(bpw=16.0))
    assert r.status is SolveStatus.OPTIMAL and r.objective == 0.0


@pytest.mark.parametrize("kw", [{"time_limit_s": 0}, {"rel_gap": -1.0}, {"max_states": 0},
                                {"max_nodes": 1.5}, {"first_core": True}])
def test_bad_config_raises(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError):
        MckpSolver(**kw)  # type: ignore[arg-type]


def test_registered_and_capabilities() -> None:
    s = solvers.get_solver("mckp")
    assert isinstance(s, MckpSolver)
    assert s.capabilities.exact and s.capabilities.multi_resource and s.capabilities.frontier
    assert s.params()["rel_gap"] == 1e-9


@pytest.mark.parametrize("name", ["mckp", "ilp", "brute_force"])
def test_zero_cap_forbids_any_use_however_small(name: str) -> None:
    # u1's int2 uses 1e-71 bops: within the central check's absolute round-off slack, but a zero
    # cap means none. Every exact solver must read it so, or they disagree on the optimum
    # (CI once found mckp at cost 1 against a brute force that took the 1e-71 at cost 0).
    opts = ["int2-g128-asym", "int3-g128-asym"]
    t = CostTable.from_unit_costs(units=["u0", "u1", "u2"], params=[128] * 3, options=opts,
                                  cost=[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]],
                                  resources={"bops": [[1.0, 0.0], [1e-71, 0.0], [0.0, 0.0]]})
    # Room for two int3s and one int2 (1120 bits). u0 must take int3 (its int2 uses bops). Were
    # u1's 1e-71 allowed, u1 would take int2 and u2 int3 at cost 0; as it is not, u1 takes the
    # second int3 and u2 the int2 at cost 1.
    budget = Budget(size_bytes=(416 + 416 + 288) / 8, max={"bops": 0.0})
    r = solvers.solve(t, budget, solver=name)
    assert r.status is SolveStatus.OPTIMAL, r.message
    assert r.plan is not None and r.plan.choice["u1"] == "int3-g128-asym"
    assert r.objective == 1.0


@pytest.mark.parametrize("name", ["mckp", "ilp", "brute_force"])
def test_tiny_cap_is_a_zero_cap(name: str) -> None:
    # A cap of 1e-300 is a zero cap (solvers.within_cap); unit a uses 1e-200 in every option,
    # below the cap's magnitude of any real resource yet not zero: no plan exists.
    t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128], options=OPTS[:2],
                                  cost=[[1.0, 0.0], [1.0, 0.0]],
                                  resources={"bops": [[1e-200, 1e-200], [0.0, 0.0]]})
    r = solvers.solve(t, Budget(bpw=8.0, max={"bops": 1e-300}), solver=name)
    assert r.status is SolveStatus.INFEASIBLE, r.message
