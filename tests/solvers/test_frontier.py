"""The Pareto frontier: hull points optimal at their own size, exact points, plans, files."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from allocator import Budget
from allocator.core.errors import InvalidParameterError
from allocator.core.plan import check_plan
from allocator.core.result import SolveStatus
from allocator.core.synth import synth_table


@pytest.fixture(scope="module")
def table():  # type: ignore[no-untyped-def]
    return synth_table(n_units=42, n_options=5, seed=7, ties=True)


def test_hull_points_are_optimal_at_their_own_size(table) -> None:  # type: ignore[no-untyped-def]
    f = solvers.frontier(table)
    assert len(f) > 1 and np.all(np.diff(f.size_bits) > 0) and np.all(np.diff(f.cost) < 0)
    for i in np.linspace(0, len(f) - 1, 15).round().astype(int):
        plan = f.plan(int(i))
        budget = Budget(size_bytes=f.size_bits[i] / 8)
        assert check_plan(plan, table, budget) == []
        assert plan.summary.size_bits == pytest.approx(f.size_bits[i], rel=1e-12)
        assert plan.summary.predicted_cost == pytest.approx(f.cost[i], rel=1e-9, abs=1e-12)
        best = solvers.solve(table, budget)
        assert best.status is SolveStatus.OPTIMAL and best.objective is not None
        assert plan.summary.predicted_cost == pytest.approx(best.objective, rel=1e-9, abs=1e-12)


def test_exact_points_at_requested_budgets(table) -> None:  # type: ignore[no-untyped-def]
    budgets = [Budget(bpw=3.1), Budget(bpw=4.4), Budget(bpw=1.0)]  # the last is infeasible
    f = solvers.frontier(table, budgets=budgets)
    exact = np.flatnonzero(f.kind == "exact")
    assert len(exact) == 2
    for i, b in zip(exact, budgets[:2], strict=True):
        r = solvers.solve(table, b)
        assert r.objective == pytest.approx(f.cost[i], rel=1e-12)
        plan = f.plan(int(i))
        assert check_plan(plan, table, b) == []
        # on or above the convex hull at the same size
        hull = f.kind == "hull"
        assert f.cost[i] >= np.interp(f.size_bits[i], f.size_bits[hull], f.cost[hull]) * (1 - 1e-9)


def test_files_and_frame(table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = solvers.frontier(table, budgets=[Budget(bpw=3.5)])
    frame = f.to_frame()
    assert list(frame.columns) == ["size_bits", "bpw", "cost", "kind", "status"]
    assert len(frame) == len(f) and set(frame["kind"]) == {"hull", "exact"}
    csv = f.save_csv(tmp_path / "f.csv")
    assert csv.read_text().startswith("size_bits,bpw,cost,kind,status")
    png = f.plot(tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f.points[0].bpw == pytest.approx(f.bpw[0])
    with pytest.raises(InvalidParameterError):
        f.plan(len(f))


def test_every_hull_prefix_is_a_plan_without_ties() -> None:
    t = synth_table(n_units=9, n_options=4, seed=1)
    f = solvers.frontier(t)
    assert len(f) == 1 + 9 * 3  # 4^-b costs are convex: every option is a hull vertex
    sizes = [f.plan(i).summary.size_bits for i in range(len(f))]
    assert sizes == pytest.approx(list(f.size_bits), rel=1e-12)
