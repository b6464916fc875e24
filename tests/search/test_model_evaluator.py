"""The real evaluator: same error as a direct apply + evaluate, weights restored, running steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import solvers
from allocator import Budget, CostTable, InvalidPlanError, check_plan

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def lm() -> Any:
    from allocator.model.loading import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def lm_table(lm: Any) -> CostTable:
    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units
    from sensitivity import EstimateContext, get_estimator

    ctx = EstimateContext(batches=[], units=list(discover_units(lm.model)),
                          options=parse_options("int2-g64-asym,int3-g64-asym,int4-g64-asym,int8-g64-asym"),
                          seed=0, model_kind=lm.kind)
    return get_estimator("datafree").estimate(lm.model, ctx)


@pytest.fixture(scope="module")
def evaluator(lm: Any, lm_table: CostTable) -> Any:
    from allocator.backend.search_eval import ModelEvaluator

    return ModelEvaluator(model=lm, table=lm_table, samples=8, seq_len=64, batch_size=3)


def _plan(table: CostTable, bpw: float) -> dict[str, str]:
    r = solvers.solve(table, Budget(bpw=bpw))
    assert r.plan is not None
    return r.plan.choice


def test_error_matches_direct_apply_and_evaluate(lm: Any, lm_table: CostTable, evaluator: Any) -> None:
    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.core.plan import BitPlan

    choice = _plan(lm_table, 3.0)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    value = evaluator(choice)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored"
    ref = reference_outputs(lm.model, evaluator.batches, kind=lm.kind)
    apply_plan(lm.model, BitPlan.from_choice(lm_table, choice))
    direct = evaluate(lm.model, evaluator.batches, ref).error
    lm.model.load_state_dict(before)
    assert value == pytest.approx(direct, rel=1e-6)
    assert value > 0


def test_running_steps_end_at_the_full_error(lm_table: CostTable, evaluator: Any) -> None:
    choice = _plan(lm_table, 2.6)
    steps = list(evaluator.evaluate_steps(choice))
    assert len(steps) == len(evaluator.batches) >= 2
    assert steps[-1] == pytest.approx(evaluator(choice), rel=1e-9)


def test_fewer_bits_give_a_larger_error(lm_table: CostTable, evaluator: Any) -> None:
    assert evaluator(_plan(lm_table, 2.6)) > evaluator(_plan(lm_table, 4.5))


def test_scored_split_is_not_the_held_out_split(evaluator: Any) -> None:
    assert evaluator.data.source.startswith("builtin:calibration@")


def test_empty_choice_is_refused(evaluator: Any) -> None:
    with pytest.raises(InvalidPlanError, match="empty choice"):
        evaluator({})


def test_search_and_pareto_with_the_model_in_the_loop(tmp_path: Path, lm_table: CostTable) -> None:
    from allocator.jobs.search import EvaluatorKind, SearchSpec, run_pareto, run_search

    path = tmp_path / "t.parquet"
    lm_table.save(path)
    spec = SearchSpec(table_path=str(path), budget={"bpw": 3.0}, n_trials=8, seed=0,
                      evaluator=EvaluatorKind.MODEL, model="tiny-llama", samples=6, seq_len=48)
    r = run_search(spec)
    assert r.plan is not None and check_plan(r.plan, lm_table, Budget(bpw=3.0)) == []
    assert r.stats["measured_error"] <= r.stats["warm_measured_error"] + 1e-12
    front = run_pareto(spec, population_size=4)
    assert front and all(check_plan(p.plan, lm_table, Budget(bpw=3.0)) == [] for p in front)
    sizes = [p.size_bits for p in front]
    errors = [p.error for p in front]
    assert sizes == sorted(sizes)
    # a Pareto front: a larger plan on it must measure a smaller error
    pairs = list(zip(sizes, errors, strict=True))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:], strict=False)), pairs
