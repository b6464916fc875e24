"""The plans a run measures before refining (allocator.jobs.pipeline.run_candidates)."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from allocator import Budget, CostTable
from allocator.core.plan import BitPlan, check_plan
from allocator.jobs.pipeline import floor_optimum, run_candidates, uniform_plans

OPTIONS = [("int2-g128-asym", 2, 2.25), ("int3-g128-sym", 3, 3.125), ("int3-g128-asym", 3, 3.25),
           ("int4-g128-sym", 4, 4.125), ("int4-g128-asym", 4, 4.25)]


def _table(costs: list[list[float]]) -> CostTable:
    rows = [{"unit": f"u{i}", "params": 1024, "option": label, "bits": bits, "size_bits": 1024 * bpw,
             "cost": c}
            for i, row in enumerate(costs) for (label, bits, bpw), c in zip(OPTIONS, row, strict=True)]
    return CostTable(pd.DataFrame(rows))


# u0 gains most from 4 bits, u2 loses least at 2 bits: the free optimum puts u2 at int2
COSTS = [[9.0, 4.0, 3.8, 0.2, 0.1], [5.0, 2.0, 1.9, 1.0, 0.9], [0.3, 0.25, 0.2, 0.1, 0.05],
         [6.0, 3.0, 2.9, 1.5, 1.4]]


def test_floor_optimum_is_the_best_plan_without_narrower_units() -> None:
    table, budget = _table(COSTS), Budget(bpw=3.25)
    below, _ = uniform_plans(table, budget.size_cap_bits(table.total_params))
    assert below is not None and set(below.choice.values()) == {"int3-g128-asym"}
    floor = floor_optimum(table, budget, below)
    assert floor is not None and not check_plan(floor, table, budget)
    assert all(not o.startswith("int2") for o in floor.choice.values())
    # brute force over every assignment of ≥ 3-bit options that fits
    cost = {(r.unit, r.option): r.cost for r in table.df.itertuples()}
    size = {(r.unit, r.option): r.size_bits for r in table.df.itertuples()}
    wide = [o for o, bits, _ in OPTIONS if bits >= 3]
    best = min(sum(cost[(u, o)] for u, o in zip(table.units, combo, strict=True))
               for combo in itertools.product(wide, repeat=table.n_units)
               if sum(size[(u, o)] for u, o in zip(table.units, combo, strict=True))
               <= budget.size_cap_bits(table.total_params))
    assert floor.summary.predicted_cost == pytest.approx(best)


def test_run_candidates_add_the_floor_plan_for_gptq_only() -> None:
    table, budget = _table(COSTS), Budget(bpw=3.5)
    import solvers

    opt = solvers.solve(table, budget).plan
    assert opt is not None and "int2-g128-asym" in opt.choice.values()
    below, _ = uniform_plans(table, budget.size_cap_bits(table.total_params))
    rtn = run_candidates(table, budget, opt, below, method="rtn")
    assert list(rtn) == ["table optimum", "uniform ≤"]
    gptq = run_candidates(table, budget, opt, below, method="gptq")
    assert list(gptq) == ["table optimum", "optimum ≥ 3 bits", "uniform ≤"]
    assert gptq["optimum ≥ 3 bits"].choice == floor_optimum(table, budget, below).choice  # type: ignore[union-attr]
    assert run_candidates(table, budget, opt, None, method="gptq") == {"table optimum": opt}


def test_the_floor_plan_is_left_out_when_it_is_another_candidate() -> None:
    # every unit gains little from 4 bits and loses much at 2: the optimum is already ≥ 3 bits
    table, budget = _table([[9.0, 1.0, 0.9, 0.8, 0.7]] * 4), Budget(bpw=3.25)
    import solvers

    opt = solvers.solve(table, budget).plan
    below, _ = uniform_plans(table, budget.size_cap_bits(table.total_params))
    assert opt is not None and all(not o.startswith("int2") for o in opt.choice.values())
    assert list(run_candidates(table, budget, opt, below, method="gptq")) == ["table optimum", "uniform ≤"]
    assert isinstance(opt, BitPlan)
