"""Known-answer problems, a hypothesis strategy for small tables, and an independent oracle.

The oracle enumerates the table itself (tie groups, per-unit restrictions, caps) with numpy and
never touches :mod:`solvers`, so it checks every solver, ``brute_force`` included.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from allocator.core.budget import SIZE_RTOL, Budget
from allocator.core.plan import allowed_mask
from allocator.core.table import CostTable
from solvers import within_cap

__all__ = ["KNOWN_ANSWER_CASES", "KnownCase", "Optimum", "exhaustive_optimum", "problems"]

I2, I3, I4, I8 = "int2-g128-asym", "int3-g128-asym", "int4-g128-asym", "int8-g128-asym"
#: Storage of 128 weights: int2 2.25 bpw (288 bits), int3 416, int4 544, int8 1056.
OPTION_POOL = (I2, I3, I4, I8, "fp16", "q4_K", "q6_K")


@dataclass(frozen=True, kw_only=True)
class KnownCase:
    """A tiny problem whose optimum was derived by hand (the derivation is in ``note``)."""

    name: str
    make_table: Callable[[], CostTable]
    budget: Budget
    optimum: float | None  #: None: infeasible
    choice: dict[str, str] | None = None  #: the unique optimal plan, when it is unique
    min_feasible: float | None = None  #: for infeasible cases: the smallest feasible budget
    note: str = ""

    @property
    def needs_caps(self) -> bool:
        return bool(self.budget.max)


def _two(cost: list[list[float]], opts: tuple[str, ...] = (I2, I4), **kw: Any) -> CostTable:
    return CostTable.from_unit_costs(units=["a", "b"], params=[128, 128], options=list(opts),
                                     cost=cost, **kw)


def _missing_option() -> CostTable:
    rows = [("a", I2, 2, 288, 6.0), ("a", I4, 4, 544, 2.0), ("a", I8, 8, 1056, 0.0),
            ("b", I4, 4, 544, 3.0), ("b", I8, 8, 1056, 0.0)]
    df = pd.DataFrame(rows, columns=["unit", "option", "bits", "size_bits", "cost"])
    df.insert(1, "params", 128)
    return CostTable(df)


KNOWN_ANSWER_CASES: tuple[KnownCase, ...] = (
    KnownCase(
        name="one_upgrade", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(bpw=3.25), optimum=5.0, choice={"a": I2, "b": I4},
        note="cap 832 bits = 288 + 544: one int4; b gains 8, a gains 3"),
    KnownCase(
        name="everything_fits", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(bpw=16.0), optimum=2.0, choice={"a": I4, "b": I4}),
    KnownCase(
        name="non_convex", budget=Budget(bpw=3.25), optimum=10.0, choice={"a": I4, "b": I2},
        make_table=lambda: _two([[10.0, 9.0, 0.0], [10.0, 2.0, 1.0]], opts=(I2, I3, I4)),
        note="832 bits: (2,4)=11, (3,3)=11, (4,2)=10; dropping by Δcost/Δsize gives 11"),
    KnownCase(
        name="tie_group", budget=Budget(size_bytes=172.0), optimum=6.0,
        choice={"q": I4, "k": I4, "v": I2},
        make_table=lambda: CostTable.from_unit_costs(
            units=["q", "k", "v"], params=[128] * 3, options=[I2, I4],
            cost=[[8.0, 0.0], [0.5, 0.0], [6.0, 0.0]], tie=["qk", "qk", None]),
        note="1376 bits = 3·288 + 512: two upgrades; untied q+v → 0.5, tied (q,k) → 6, v → 8.5"),
    KnownCase(
        name="allowed_restriction", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(bpw=3.25, allowed={"b": (I2,)}), optimum=10.0, choice={"a": I4, "b": I2}),
    KnownCase(
        name="max_bits", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(bpw=16.0, max_bits=3), optimum=13.0, choice={"a": I2, "b": I2}),
    KnownCase(
        name="unit_min_bits", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(bpw=3.25, unit_min_bits={"a": 4}), optimum=10.0, choice={"a": I4, "b": I2}),
    KnownCase(
        name="resource_cap", budget=Budget(bpw=3.25, max={"bops": 3.5}), optimum=10.0,
        choice={"a": I4, "b": I2},
        make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]],
                                resources={"bops": [[1.0, 2.0], [1.0, 5.0]]}),
        note="bops of (a4,b2)=3 fits, (a2,b4)=6 does not"),
    KnownCase(
        name="missing_option", make_table=_missing_option, budget=Budget(bpw=6.25), optimum=2.0,
        choice={"a": I4, "b": I8},
        note="1600 bits: (4,4)=5 1088, (8,4)=3 1600, (2,8)=6 1344, (4,8)=2 1600, (8,8) too big"),
    KnownCase(
        name="all_zero_costs", make_table=lambda: _two([[0.0, 0.0], [0.0, 0.0]]),
        budget=Budget(bpw=3.0), optimum=0.0),
    KnownCase(
        name="infeasible_bpw", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(bpw=2.0), optimum=None, min_feasible=2.25),
    KnownCase(
        name="infeasible_bytes", make_table=lambda: _two([[4.0, 1.0], [9.0, 1.0]]),
        budget=Budget(size_bytes=50.0), optimum=None, min_feasible=72.0,
        note="smallest plan: 2 × 288 bits = 72 bytes"),
)


@dataclass(frozen=True, kw_only=True)
class Optimum:
    """What exhaustive enumeration found."""

    cost: float  #: inf when nothing fits
    size_bits: float | None  #: size of the optimal plan
    min_size_bits: float  #: smallest size of any plan (resource caps ignored)
    n_plans: int
    feasible_costs: np.ndarray = field(repr=False)  #: cost of every plan within every cap


def exhaustive_optimum(table: CostTable, budget: Budget) -> Optimum:
    """Least cost over every assignment that honours ties, restrictions and every cap."""
    df = table.df
    ok = allowed_mask(table, budget)
    units = df["unit"].to_numpy(dtype=object)
    key = units if not table.has_ties else np.where(
        df["tie"].to_numpy(dtype=object) != "", "t:" + df["tie"].to_numpy(dtype=object),
        "u:" + units)
    item, _ = pd.factorize(key)
    unit, _ = pd.factorize(units)
    option, _ = pd.factorize(df["option"])
    n_items, n_opts = int(item.max()) + 1, int(option.max()) + 1
    members = np.zeros(n_items, dtype=np.int64)
    np.add.at(members, item[np.unique(unit, return_index=True)[1]], 1)
    count = np.zeros((n_items, n_opts), dtype=np.int64)
    np.add.at(count, (item, option), ok.astype(np.int64))
    cols = ["size_bits", "cost", *budget.max]
    sums = np.zeros((len(cols), n_items, n_opts))
    for c, col in enumerate(cols):
        np.add.at(sums[c], (item, option), df[col].to_numpy(np.float64))
    valid = count == members[:, None]  # every member offers the option and may take it
    choices = [np.flatnonzero(v) for v in valid]
    if any(len(c) == 0 for c in choices):
        return Optimum(cost=np.inf, size_bits=None, min_size_bits=np.inf, n_plans=0,
                       feasible_costs=np.empty(0))
    combos = np.array(list(itertools.product(*choices)), dtype=np.int64).reshape(-1, n_items)
    tot = sums[:, np.arange(n_items), combos].sum(axis=2)  # (n_cols, n_plans)
    cap = budget.size_cap_bits(table.total_params)
    fits = tot[0] <= cap * (1 + SIZE_RTOL)
    for k, hi in enumerate(budget.max.values()):
        fits &= within_cap(tot[2 + k], hi)
    cost = np.where(fits, tot[1], np.inf)
    at = int(np.argmin(cost))
    return Optimum(cost=float(cost[at]), size_bits=float(tot[0, at]) if fits.any() else None,
                   min_size_bits=float(tot[0].min()), n_plans=len(combos),
                   feasible_costs=tot[1, fits])


#: Resource values are 0 or ≥ 0.01: subnormal caps are not a table anyone writes, and solvers
#: treat caps below 1e-12 as zero (they forbid every slot that uses the resource).
_RES = st.one_of(st.just(0.0), st.floats(0.01, 100.0))
@functools.lru_cache(maxsize=8192)
def _table(opts: tuple[str, ...], params: tuple[int, ...], cost: tuple[tuple[float, ...], ...],
           tie: tuple[str, ...] | None, bops: tuple[tuple[float, ...], ...]) -> CostTable:
    """Tables are cached by content: a derandomized run draws the same problems for every
    solver, and validating a table costs more than solving it."""
    return CostTable.from_unit_costs(units=[f"u{i}" for i in range(len(params))], params=params,
                                     options=opts, cost=cost, tie=tie, resources={"bops": bops})


_COSTS = st.one_of(st.floats(0.0, 10.0, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5]))


@st.composite
def problems(draw: st.DrawFn, *, max_units: int = 5, max_options: int = 4, caps: bool = True,
             ties: bool = True, restrictions: bool = True) -> tuple[CostTable, Budget]:
    """Small (table, budget) pairs: shared costs, tie groups, resource caps, per-unit limits.

    Budgets range from below the smallest plan (infeasible) to above the largest.
    """
    n = draw(st.integers(1, max_units))
    k = draw(st.integers(1, max_options))
    opts = draw(st.permutations(OPTION_POOL))[:k]
    params = [256 * draw(st.integers(1, 12)) for _ in range(n)]
    cost = [[draw(_COSTS) for _ in range(k)] for _ in range(n)]
    tie = None
    if ties and draw(st.booleans()):
        tie = tuple(draw(st.lists(st.sampled_from(["", "t1", "t2"]), min_size=n, max_size=n)))
    bops = tuple(tuple(draw(_RES) for _ in range(k)) for _ in range(n))
    table = _table(tuple(opts), tuple(params), tuple(map(tuple, cost)), tie, bops)
    cap = {"bops": draw(st.one_of(st.just(0.0), st.floats(0.01, 100.0 * n)))} \
        if caps and draw(st.booleans()) else {}
    extra: dict[str, Any] = {}
    if restrictions and draw(st.integers(0, 3)) == 0:
        which = draw(st.sampled_from(["max_bits", "min_bits", "allowed"]))
        if which == "allowed":
            extra["allowed"] = {"u0": tuple(draw(st.lists(st.sampled_from(opts), min_size=1,
                                                          max_size=k, unique=True)))}
        else:
            extra[which] = draw(st.sampled_from([3.0, 4.0, 6.0]))
    return table, Budget(bpw=draw(st.floats(1.5, 17.0)), max=cap, **extra)
