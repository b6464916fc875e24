"""Operating-point refinement (allocator.jobs.refine): pure pieces and a real model round."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import solvers
from allocator import Budget, CostTable
from allocator.core.errors import InvalidParameterError
from allocator.core.plan import BitPlan, check_plan
from allocator.jobs.refine import (
    RefineConfig,
    RefineStatus,
    move_priority,
    neighbour_options,
    refine_plan,
    tie_groups,
    trust_region_choice,
)


def _table(costs: np.ndarray, ties: list[str] | None = None) -> CostTable:
    opts = [("int2-g128-asym", 2, 2.25), ("int3-g128-asym", 3, 3.25), ("int4-g128-asym", 4, 4.25)]
    rows = []
    for i, row in enumerate(costs):
        for (label, bits, bpw), c in zip(opts, row, strict=True):
            rows.append({"unit": f"u{i}", "params": 1024, "option": label, "bits": bits,
                         "size_bits": 1024 * bpw, "cost": float(c),
                         **({"tie": ties[i]} if ties else {})})
    return CostTable(pd.DataFrame(rows))


def test_neighbour_options_by_size() -> None:
    sizes = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert neighbour_options(sizes, "b", 1) == ["a", "c"]
    assert neighbour_options(sizes, "a", 2) == ["b", "c"]
    assert neighbour_options(sizes, "d", 1) == ["c"]


def test_trust_region_caps_moves_and_keeps_budget() -> None:
    rng = np.random.default_rng(0)
    costs = np.sort(rng.uniform(0, 10, (12, 3)), axis=1)[:, ::-1]  # more bits, lower cost
    table = _table(costs)
    budget = Budget(bpw=3.25)
    current = dict.fromkeys(table.units, "int3-g128-asym")
    free = solvers.solve(table, budget).plan
    assert free is not None
    free_moves = sum(free.choice[u] != current[u] for u in current)
    assert free_moves > 2
    for cap in (0, 1, 2, free_moves):
        choice, change = trust_region_choice(table, budget, current, cap)
        assert sum(choice[u] != current[u] for u in current) <= cap
        plan = BitPlan.from_choice(table, choice)
        assert not check_plan(plan, table, budget)
        assert change <= 1e-12  # never predicted worse than staying
    full, change = trust_region_choice(table, budget, current, free_moves)
    assert change == pytest.approx(free.summary.predicted_cost - BitPlan.from_choice(
        table, current).summary.predicted_cost)


def test_tie_groups_move_together() -> None:
    table = _table(np.ones((4, 3)), ties=["qkv", "qkv", "", ""])
    assert tie_groups(table) == {"tie:qkv": ["u0", "u1"], "u2": ["u2"], "u3": ["u3"]}


@pytest.mark.parametrize("bad", [{"rounds": -1}, {"neighbours": 0}, {"trust": 0.0},
                                 {"trust": 1.5}, {"rounds": True}, {"cache_mb": -1},
                                 {"cache_mb": 1.5}])
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError, match="refine"):
        RefineConfig(**bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vit() -> dict[str, object]:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units
    from allocator.model.data import data_for
    from allocator.model.loading import load_model
    from sensitivity import EstimateContext, get_estimator

    loaded = load_model("vit-digits")
    model = loaded.model.eval()
    calib = list(data_for(loaded, "calibration", 32, batch_size=16))
    units = discover_units(model)
    ctx = EstimateContext(batches=calib, units=units, options=parse_options(None), seed=0,
                          model_kind=str(loaded.kind), progress=False)
    table = get_estimator("hessian-proxy").estimate(model, ctx)
    return {"model": model, "calib": calib, "units": units, "table": table, "kind": str(loaded.kind)}


def test_refine_never_worse_than_candidates_and_restores_weights(vit: dict[str, object]) -> None:
    import torch

    model, table = vit["model"], vit["table"]
    assert isinstance(model, torch.nn.Module) and isinstance(table, CostTable)
    budget = Budget(bpw=3.0)
    opt = solvers.solve(table, budget).plan
    uni = BitPlan.from_choice(table, dict.fromkeys(table.units, "int2-g128-asym"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = refine_plan(model, {"table optimum": opt, "uniform ≤": uni}, table, budget,
                      vit["calib"], vit["units"], kind=vit["kind"],  # type: ignore[arg-type]
                      config=RefineConfig(rounds=2))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(res.candidates) == {"table optimum", "uniform ≤"}
    assert res.start_label == min(res.candidates, key=lambda k: res.candidates[k])
    assert res.error <= min(res.candidates.values()) + 1e-12
    assert res.start_error == pytest.approx(res.candidates[res.start_label], rel=1e-9)
    assert not check_plan(res.plan, table, budget)
    assert res.status in (RefineStatus.CONVERGED, RefineStatus.ROUND_LIMIT)
    errors = [res.start_error] + [r.error_trial for r in res.rounds if r.accepted]
    assert errors == sorted(errors, reverse=True) and errors[-1] == res.error
    assert all(r.moved <= max(1, round(0.25 * table.n_units)) for r in res.rounds)


def test_refine_zero_rounds_only_selects(vit: dict[str, object]) -> None:
    table = vit["table"]
    assert isinstance(table, CostTable)
    budget = Budget(bpw=3.25)
    uni = BitPlan.from_choice(table, dict.fromkeys(table.units, "int3-g128-asym"))
    low = BitPlan.from_choice(table, dict.fromkeys(table.units, "int2-g128-asym"))
    res = refine_plan(vit["model"], {"int3": uni, "int2": low}, table, budget,  # type: ignore[arg-type]
                      vit["calib"], vit["units"], kind=vit["kind"],  # type: ignore[arg-type]
                      config=RefineConfig(rounds=0))
    assert res.start_label == "int3" and res.plan is uni and not res.rounds
    assert res.candidates["int3"] < res.candidates["int2"]


def test_move_priority_orders_by_table_swing() -> None:
    costs = np.array([[1.0, 0.9, 0.8], [9.0, 3.0, 1.0], [4.0, 2.0, 1.5]])
    table = _table(costs)
    groups = tie_groups(table)
    sizes = {g: dict(zip(sub["option"], sub["size_bits"], strict=True))
             for g, sub in table.df.groupby("unit")}
    current = dict.fromkeys(table.units, "int3-g128-asym")
    assert move_priority(table, groups, current, sizes, 1) == ["u1", "u2", "u0"]


def test_time_limit_stops_with_the_best_measured_plan(vit: dict[str, object]) -> None:
    table = vit["table"]
    assert isinstance(table, CostTable)
    budget = Budget(bpw=3.0)
    opt = solvers.solve(table, budget).plan
    res = refine_plan(vit["model"], {"table optimum": opt}, table, budget,  # type: ignore[arg-type]
                      vit["calib"], vit["units"], kind=vit["kind"],  # type: ignore[arg-type]
                      config=RefineConfig(rounds=5, time_limit=1e-9))
    assert res.status is RefineStatus.TIME_LIMIT and not res.rounds
    assert res.plan is opt and res.error == res.start_error
    with pytest.raises(InvalidParameterError, match="time_limit"):
        RefineConfig(time_limit=0)


@pytest.mark.parametrize("share", [-0.1, 0.6, True, "0.25"])
def test_config_refuses_bad_validation_share(share: object) -> None:
    with pytest.raises(InvalidParameterError, match="refine validation_share"):
        RefineConfig(validation_share=share)  # type: ignore[arg-type]


def test_refine_measures_on_fit_and_records_both_shares(vit: dict[str, object]) -> None:
    table = vit["table"]
    assert isinstance(table, CostTable)
    budget = Budget(bpw=3.0)
    opt = solvers.solve(table, budget).plan
    uni = BitPlan.from_choice(table, dict.fromkeys(table.units, "int2-g128-asym"))
    res = refine_plan(vit["model"], {"table optimum": opt, "uniform ≤": uni},  # type: ignore[arg-type]
                      table, budget, vit["calib"], vit["units"], kind=vit["kind"],  # type: ignore[arg-type]
                      config=RefineConfig(rounds=2))
    assert res.validation["n_fit"] == 24 and res.validation["n_validation"] == 8
    assert res.judged_on == "validation" and set(res.candidates_fit) == set(res.candidates)
    # the shares are different data: the same plan measures differently on them
    assert res.candidates_fit["uniform ≤"] != pytest.approx(res.candidates["uniform ≤"], rel=1e-6)
    assert res.start_fit_error == pytest.approx(res.candidates_fit[res.start_label], rel=1e-6)
    assert res.rounds
    for r in res.rounds:
        assert r.fit_before > 0 and r.fit_trial > 0 and r.error_before > 0
        assert r.accepted == (r.fit_trial < r.fit_before and r.error_trial < r.error_before)
    record = res.to_dict()
    assert {"fit_before", "fit_trial", "error_before", "error_trial"} <= set(record["rounds"][0])
    assert record["validation"]["n_validation"] == 8 and record["judged_on"] == "validation"
    # validation_share 0: the calibration data judges itself (one share, equal errors)
    same = refine_plan(vit["model"], {"table optimum": opt}, table, budget,  # type: ignore[arg-type]
                       vit["calib"], vit["units"], kind=vit["kind"],  # type: ignore[arg-type]
                       config=RefineConfig(rounds=1, validation_share=0))
    assert not same.validation and same.judged_on == "calibration"
    assert all(r.fit_trial == r.error_trial for r in same.rounds)


class _Scripted:
    """Measurement by formula instead of a model: each share's D(P) is a function of the plan
    the (fake) weights hold. Monkeypatched over refine's ``_Meter`` and ``_Weights``."""

    def __init__(self, fit: object, val: object) -> None:
        self.at: dict[str, str] = {}
        self.errors = {"fit": fit, "val": val}
        state = self

        class Weights:
            def __init__(self, model: object, units: object, quantizer: object) -> None:
                pass

            def set(self, unit: str, option: str) -> None:
                state.at[unit] = option

            def set_plan(self, choice: dict[str, str]) -> None:
                state.at.update(choice)

            def restore(self) -> None:
                state.at.clear()

        class Cache:
            def start_block(self, unit: object) -> int:
                return 0

        class Meter:
            def __init__(self, model: object, batches: list[dict[str, str]], *, kind: str,
                         max_tokens: int, cache_bytes: int) -> None:
                self.share = batches[0]["share"]
                self.cache = Cache()
                self.forwards = 0

            def value(self) -> float:
                self.forwards += 1
                return float(state.errors[self.share](dict(state.at)))  # type: ignore[operator]

            rebuild = full_error = value

            def error_from(self, start: int) -> float:
                return self.value()

        self.Weights, self.Meter = Weights, Meter


def _scripted_refine(monkeypatch: pytest.MonkeyPatch, fit: object, val: object,
                     cands: dict[str, dict[str, str]], table: CostTable, rounds: int = 3):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    from allocator.jobs import refine

    s = _Scripted(fit, val)
    monkeypatch.setattr(refine, "_Meter", s.Meter)
    monkeypatch.setattr(refine, "_Weights", s.Weights)
    units = [SimpleNamespace(name=u) for u in table.units]  # only names: the meter is scripted
    plans = {k: BitPlan.from_choice(table, c) for k, c in cands.items()}
    return refine_plan(None, plans, table, Budget(bpw=3.25), [{"share": "fit"}],  # type: ignore[arg-type,list-item]
                       units, kind="encoder", validation=[{"share": "val"}],  # type: ignore[list-item]
                       config=RefineConfig(rounds=rounds, trust=1.0))


def _additive(costs: np.ndarray, table: CostTable):  # type: ignore[no-untyped-def]
    col = {o: j for j, o in enumerate(("int2-g128-asym", "int3-g128-asym", "int4-g128-asym"))}
    return lambda at: 1.0 + sum(costs[int(u[1:]), col[o]] for u, o in at.items())


def test_a_move_that_helps_on_fit_but_hurts_on_validation_is_rejected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # u0 gains a lot from int4, u1 loses little at int2: the swing fits 3.25 bpw and helps on fit
    costs = np.array([[0.30, 0.20, 0.0], [0.12, 0.10, 0.09], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    table = _table(costs)
    start = dict.fromkeys(table.units, "int3-g128-asym")
    fit = _additive(costs, table)

    def val(at: dict[str, str]) -> float:  # on validation text, u1 at 2 bits costs much more
        return fit(at) + (0.5 if at.get("u1") == "int2-g128-asym" else 0.0)

    res = _scripted_refine(monkeypatch, fit, val, {"uniform": start}, table)
    first = res.rounds[0]
    assert first.fit_trial < first.fit_before  # the move helps on the data it was measured on
    assert first.error_trial > first.error_before and not first.accepted
    assert first.trials >= 1 and first.moved >= 2
    assert res.plan.choice == start and res.status is RefineStatus.CONVERGED
    assert res.error == res.start_error and res.fit_error == res.start_fit_error
    # the same move, when validation agrees with fit, is accepted
    ok = _scripted_refine(monkeypatch, fit, fit, {"uniform": start}, table)
    assert ok.rounds[0].accepted and ok.plan.choice != start
    assert ok.error < ok.start_error and ok.fit_error is not None and ok.fit_error < ok.start_fit_error


def test_candidates_are_chosen_on_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = np.array([[0.3, 0.2, 0.1]] * 4)
    table = _table(costs)
    a = dict.fromkeys(table.units, "int3-g128-asym")
    b = {**a, "u0": "int2-g128-asym", "u1": "int4-g128-asym"}

    def fit(at: dict[str, str]) -> float:  # a lower on fit
        return 1.0 if at.get("u0") == "int3-g128-asym" else 2.0

    def val(at: dict[str, str]) -> float:  # b lower on validation
        return 2.0 if at.get("u0") == "int3-g128-asym" else 1.0

    res = _scripted_refine(monkeypatch, fit, val, {"a": a, "b": b}, table, rounds=0)
    assert res.start_label == "b" and res.plan.choice == b
    assert res.candidates == {"a": 2.0, "b": 1.0} and res.candidates_fit == {"a": 1.0, "b": 2.0}
    assert res.validation["given"] is True


def test_a_smaller_block_cache_measures_the_same(vit: dict[str, object]) -> None:
    # cache_mb=0 keeps no block's outputs: every move is a full forward, with the same values
    table = vit["table"]
    assert isinstance(table, CostTable)
    budget = Budget(bpw=3.0)
    opt = solvers.solve(table, budget).plan
    runs = [refine_plan(vit["model"], {"table optimum": opt}, table, budget,  # type: ignore[arg-type]
                        vit["calib"], vit["units"], kind=vit["kind"],  # type: ignore[arg-type]
                        config=RefineConfig(rounds=1, cache_mb=mb)) for mb in (128, 0)]
    assert runs[0].rounds and runs[0].plan.choice == runs[1].plan.choice
    assert [replace(r, seconds=0.0) for r in runs[0].rounds] == \
        [replace(r, seconds=0.0) for r in runs[1].rounds]
