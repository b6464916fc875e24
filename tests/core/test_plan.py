"""BitPlan JSON (with the golden v1 file) and the central plan check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import solvers
from allocator import BitPlan, Budget, CostTable
from allocator.core.errors import InvalidPlanError
from allocator.core.plan import PLAN_VERSION, check_plan

GOLDEN = Path(__file__).parent.parent / "golden" / "plan_v1.json"
Q, DOWN = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"


@pytest.fixture
def table() -> CostTable:
    return CostTable.from_unit_costs(units=[Q, DOWN], params=[1024, 2048],
                                     options=["int4-g128-asym", "q4_K", "fp16"],
                                     cost=[[0.5, 0.4, 0.0], [2.0, 1.5, 0.0]])


def test_golden_v1_plan_keeps_loading(table: CostTable) -> None:
    plan = BitPlan.load(GOLDEN)
    assert plan.choice == {Q: "int4-g128-asym", DOWN: "q4_K"}
    a = plan.assignments[Q]
    assert (a.bits, a.group_size, a.symmetric) == (4, 128, False)
    assert plan.summary.size_bits == 13568.0 and plan.summary.predicted_cost == 2.0
    assert plan.budget == {"bpw": 4.5} and plan.solver.status == "optimal"
    assert plan.provenance["estimator"] == "synthetic"
    assert check_plan(plan, table, Budget(bpw=4.5)) == []
    # and writes back the same document (key for key)
    assert plan.to_dict() == json.loads(GOLDEN.read_text())


def test_solver_plan_round_trips_through_a_file(table: CostTable, tmp_path: Path) -> None:
    r = solvers.solve(table, Budget(bpw=4.5))
    assert r.plan is not None
    path = r.plan.save(tmp_path / "plan.json")
    back = BitPlan.load(path)
    assert back == r.plan and check_plan(back, table, Budget(bpw=4.5)) == []
    assert back.provenance["table_sha256"] == table.fingerprint
    assert back.to_dict()["version"] == PLAN_VERSION


def test_check_plan_finds_every_problem(table: CostTable) -> None:
    ok = BitPlan.from_choice(table, {Q: "int4-g128-asym", DOWN: "q4_K"})
    assert check_plan(ok, table, Budget(bpw=4.5)) == []
    assert any("exceeds the cap" in p for p in check_plan(ok, table, Budget(bpw=4.0)))
    assert any("forbids" in p for p in check_plan(ok, table, Budget(bpw=9, max_bits=3)))
    partial = BitPlan.from_choice(table.subset([Q]), {Q: "fp16"})
    assert any("have no option" in p for p in check_plan(partial, table))
    tampered = BitPlan(assignments=ok.assignments, solver=ok.solver,
                       summary=type(ok.summary)(params=3072, size_bits=1.0, bpw=1.0,
                                                predicted_cost=0.0))
    problems = check_plan(tampered, table)
    assert any("summary size_bits" in p for p in problems)
    assert any("summary predicted_cost" in p for p in problems)


def test_check_plan_names_unknown_units_and_options(table: CostTable) -> None:
    doc = BitPlan.load(GOLDEN).to_dict()
    doc["assignments"]["ghost"] = {"option": "fp16", "bits": 16}
    assert "does not have" in check_plan(BitPlan.from_dict(doc), table)[0]
    doc = BitPlan.load(GOLDEN).to_dict()
    doc["assignments"][Q]["option"] = "int3-g128-asym"
    assert "does not offer" in check_plan(BitPlan.from_dict(doc), table)[0]


def test_ties_must_share_an_option() -> None:
    t = CostTable.from_unit_costs(units=["q", "k"], params=[128, 128],
                                  options=["int2-g128-asym", "int4-g128-asym"],
                                  cost=[[1, 0], [1, 0]], tie=["qk", "qk"])
    mixed = BitPlan.from_choice(t, {"q": "int2-g128-asym", "k": "int4-g128-asym"})
    assert any("mixes options" in p for p in check_plan(mixed, t))


@pytest.mark.parametrize("doc,pattern", [
    ({"format": "something"}, "not a bit plan"),
    ({"format": "bitalloc.plan", "version": 2}, "version 2"),
    ({"format": "bitalloc.plan", "version": 1, "assignments": {}}, "malformed"),
])
def test_bad_plan_documents(doc: dict[str, object], pattern: str) -> None:
    with pytest.raises(InvalidPlanError, match=pattern):
        BitPlan.from_dict(doc)


def test_plan_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidPlanError, match="does not exist"):
        BitPlan.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidPlanError, match="is not JSON"):
        BitPlan.load(tmp_path / "bad.json")
