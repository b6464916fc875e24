"""benchmarks/ranking.py: its equal-size plan builders and rank statistics, on a synthetic table
shaped like a 4-block Llama (tied q/k/v and gate/up, as the run's default unit discovery ties them)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from allocator.core.budget import Budget
from allocator.core.formats import parse_format
from allocator.core.table import CostTable
from tests.bench_loader import load_benchmark

OPTIONS = ["int2-g64-asym", "int2-g128-asym", "int3-g128-sym", "int3-g128-asym", "int3-g64-asym",
           "int4-g128-sym", "int4-g128-asym", "int5-g128-asym", "int6-g128-asym", "int8-g128-asym", "fp16"]


def _bench() -> ModuleType:
    return load_benchmark("ranking")


def _llama_table(blocks: int = 4, seed: int = 0) -> CostTable:
    rng = np.random.default_rng(seed)
    units, params, tie = [], [], []
    layout = (("self_attn.q_proj", (256, 256), "qkv"), ("self_attn.k_proj", (128, 256), "qkv"),
              ("self_attn.v_proj", (128, 256), "qkv"), ("self_attn.o_proj", (256, 256), None),
              ("mlp.gate_proj", (512, 256), "gu"), ("mlp.up_proj", (512, 256), "gu"),
              ("mlp.down_proj", (256, 512), None))
    for b in range(blocks):
        for name, shape, t in layout:
            units.append(f"model.layers.{b}.{name}")
            params.append(shape[0] * shape[1])
            tie.append(f"model.layers.{b}.{t}" if t else None)
    bits = np.array([parse_format(o).bits_per_weight() for o in OPTIONS])
    scale = rng.lognormal(0, 1, len(units))[:, None]
    cost = scale * np.exp2(-2 * bits)[None, :] * rng.lognormal(0, 0.1, (len(units), len(OPTIONS)))
    cost[:, -1] = 0.0
    return CostTable.from_unit_costs(units=units, params=params, options=OPTIONS, cost=cost, tie=tie)


@pytest.mark.parametrize("bpw", [3.25, 4.25])
def test_every_plan_has_the_budgets_size_is_distinct_and_keeps_ties(bpw: float) -> None:
    r = _bench()
    table = _llama_table()
    plans, dropped = r.build_plans(table, bpw, perturbed=10, random=2, band_bpw=0.01, seed=0)
    cap = Budget(bpw=bpw).size_cap_bits(table.total_params)
    assert len(plans) >= 10, dropped
    b = int(bpw)
    want = {"optimum", "rule", f"uniform int{b}-g128-asym", f"rule from int{b}-g128-sym"}
    assert want <= set(plans), dropped
    assert sum(k.startswith("perturbed") for k in plans) == 10
    keys = {tuple(sorted(p.choice.items())) for p in plans.values()}
    assert len(keys) == len(plans)  # distinct
    groups = r.tie_groups(table)
    for label, p in plans.items():
        size = p.summary.size_bits
        assert cap - 0.01 * table.total_params < size <= cap * (1 + 1e-9), (label, p.summary.bpw)
        for units in groups.values():  # tied units share one option in every plan
            assert len({p.choice[u] for u in units}) == 1, (label, units)
        # the predicted cost is the unperturbed table's Σ c(u, o_u)
        df = table.df.set_index(["unit", "option"])
        assert p.summary.predicted_cost == pytest.approx(
            sum(df.loc[(u, o), "cost"] for u, o in p.choice.items()))
    assert plans["optimum"].summary.predicted_cost == min(p.summary.predicted_cost for p in plans.values())


def test_fill_leaves_less_than_any_groups_next_step() -> None:
    r = _bench()
    table = _llama_table()
    sizes = r.group_sizes(table)
    cap = Budget(bpw=3.25).size_cap_bits(table.total_params)
    start = dict.fromkeys(sizes, "int2-g128-asym")
    filled = r.fill(sizes, start, cap, order=list(sizes))
    total = r.plan_size(sizes, filled)
    assert total <= cap and filled != start
    for g, o in filled.items():
        bigger = [s for s in sizes[g].values() if s > sizes[g][o]]
        assert not bigger or total + min(bigger) - sizes[g][o] > cap, g


def test_rule_mix_promotes_value_and_down_projections_first() -> None:
    r = _bench()
    table = _llama_table()
    cap = Budget(bpw=3.25).size_cap_bits(table.total_params)
    choice = r.rule_mix(table, cap)
    assert choice is not None
    bits = {u: parse_format(o).bits for u, o in choice.items()}
    down = [bits[u] for u in choice if u.endswith("down_proj")]
    gate = [bits[u] for u in choice if u.endswith("gate_proj")]
    assert min(down) >= max(gate) and min(down) == 4  # base int2, down two rungs up
    assert r.rule_mix(table, Budget(bpw=2.0).size_cap_bits(table.total_params)) is None  # nothing fits


def test_perturbed_table_moves_costs_only() -> None:
    r = _bench()
    table = _llama_table()
    same = r.perturbed_table(table, 0.0, seed=3)
    assert np.array_equal(same.df["cost"].to_numpy(), table.df["cost"].to_numpy())
    moved = r.perturbed_table(table, 0.7, seed=3)
    assert np.array_equal(moved.df["size_bits"].to_numpy(), table.df["size_bits"].to_numpy())
    base = table.df["cost"].to_numpy()
    ratio = moved.df["cost"].to_numpy()[base > 0] / base[base > 0]
    assert 0.5 < np.std(np.log(ratio)) < 0.9  # log-normal with σ = 0.7 (over 280 rows)
    with pytest.raises(ValueError, match="band"):
        r.size_band(1.0, 10, 0.0)


def test_rank_statistics() -> None:
    r = _bench()
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert r.spearman(a, [10.0, 20.0, 30.0, 40.0, 50.0]) == pytest.approx(1.0)
    assert r.kendall(a, [50.0, 40.0, 30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert r.bootstrap_rho(a, [10.0, 20.0, 30.0, 40.0, 50.0], 200) == pytest.approx((1.0, 1.0))
    lo, hi = r.bootstrap_rho(a, [2.0, 1.0, 4.0, 3.0, 5.0], 500)
    assert -1.0 <= lo < r.spearman(a, [2.0, 1.0, 4.0, 3.0, 5.0]) < hi <= 1.0


def test_another_table_ranks_the_same_plans() -> None:
    """--compare: each other estimator's additive sum over the same plans gets its own ρ."""
    import argparse

    r = _bench()
    held = [0.1, 0.2, 0.3, 0.4, 0.5]
    labels = ["optimum", "perturbed-1", "perturbed-2", "uniform int3-g128-asym", "rule"]
    rows = [{"label": lab, "bpw": 3.25, "predicted": p, "held-out": h, "predicted_by": {"fisher": f}}
            for lab, p, h, f in zip(labels, [0.5, 0.4, 0.3, 0.2, 0.1], held, [1.0, 2.0, 3.0, 4.0, 5.0],
                                    strict=True)]
    st = r.rank_stats(rows, argparse.Namespace(bootstrap=200, seed=0))
    assert st["spearman"] == pytest.approx(-1.0)
    assert st["others"]["fisher"]["spearman"] == pytest.approx(1.0)
    assert st["others"]["fisher"]["spearman_table_derived"] == pytest.approx(1.0)
    assert st["others"]["fisher"]["ci"] == pytest.approx([1.0, 1.0])


def test_estimator_with_parameters() -> None:
    """--estimator / --compare take NAME[:KEY=VALUE,…], values read as `bitalloc estimate --param`."""
    from allocator.core.errors import InvalidParameterError

    r = _bench()
    assert r.parse_estimator("fisher") == ("fisher", {})
    assert r.parse_estimator("gauss-newton:correlations=unit,probes=4") == (
        "gauss-newton", {"correlations": "unit", "probes": 4})
    with pytest.raises(InvalidParameterError, match="KEY=VALUE"):
        r.parse_estimator("gauss-newton:unit")
    with pytest.raises(ValueError, match="no estimator name"):
        r.parse_estimator(":probes=2")
