"""apply_plan + verify round trips for every format, GPTQ vs RTN on a real layer, bad plans."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from allocator.backend import apply_plan, resolve_plan, verify  # noqa: E402
from allocator.core.errors import InvalidParameterError, InvalidPlanError  # noqa: E402
from allocator.core.plan import Assignment, BitPlan  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(256, 48)
        self.fc2 = torch.nn.Linear(48, 96)
        self.head = torch.nn.Linear(96, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(input_ids)))))


def table_for(units: list[Any], options: list[str]) -> CostTable:
    return CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                     options=options, cost=[[0.0] * len(options)] * len(units),
                                     in_features=[u.in_features for u in units])


def uniform(model: torch.nn.Module, option: str, group_columns: int | None = None) -> tuple[BitPlan, list]:
    units = discover_units(model, group_columns=group_columns)
    t = table_for(units, [option])
    return BitPlan.from_choice(t, dict.fromkeys(t.units, option)), units


INT_OPTIONS = [f"int{b}-{g}-{s}" for b in range(2, 9) for g in ("g32", "g128", "ch")
               for s in ("sym", "asym")]


@pytest.mark.parametrize("option", [*INT_OPTIONS, "fp16", "bf16", "q4_K", "q3_K", "q6_K", "q4_0",
                                    "q8_0", "int4-g64-asym-gptq"])
def test_rtn_round_trip(option: str) -> None:
    model = Net()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    plan, _ = uniform(model, option)
    report = apply_plan(model, plan)
    assert report.bpw == pytest.approx(plan.summary.bpw)
    check = verify(model, plan, reference=reference)
    assert check.ok, check.mismatches
    assert check.bpw_read == pytest.approx(plan.summary.bpw)
    if option.startswith("int") and option.startswith(("int2", "int3", "int4")):
        bits = int(option[3])
        assert max(u.max_levels for u in check.units) == 2**bits  # all levels used somewhere


@pytest.mark.parametrize("option", ["int2-g32-asym", "int3-ch-sym", "int4-g128-asym", "int8-g32-sym",
                                    "q4_K"])
def test_gptq_round_trip(option: str) -> None:
    model = Net()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randn(4, 16, 256, generator=g)} for _ in range(3)]
    plan, _ = uniform(model, option)
    apply_plan(model, plan, method="gptq", calibration=calib)
    check = verify(model, plan)
    assert check.ok, check.mismatches


def test_group_units_mixed_bits_with_and_without_units() -> None:
    model = Net()
    units = discover_units(model, group_columns=64)  # fc1 → 4 groups, others whole
    names = [u.name for u in units]
    assert "fc1[g=3]" in names and "fc2" in names
    options = ["int2-g32-asym", "int4-g32-asym", "int8-g32-sym", "fp16"]
    t = table_for(units, options)
    choice = {u: options[i % len(options)] for i, u in enumerate(t.units)}
    plan = BitPlan.from_choice(t, choice)
    resolved = {r.name: (r.lo, r.hi) for r in resolve_plan(model, plan)}  # inferred widths
    assert resolved["fc1[g=2]"] == (128, 192)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, plan, units=units)
    assert verify(model, plan, units=units, reference=ref).ok
    # the 2-bit group really is 2-bit and the 8-bit one is not
    checks = {c.unit: c for c in verify(model, plan).units}
    assert checks["fc1[g=0]"].max_levels == 4 and checks["fc1[g=2]"].max_levels > 16
    model2 = Net()
    apply_plan(model2, plan, method="gptq", units=units,
               calibration=[{"input_ids": torch.randn(8, 256)}])
    assert verify(model2, plan, units=units).ok


def test_verify_reports_every_mismatch() -> None:
    model = Net()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    applied, _ = uniform(model, "int4-g32-asym")
    apply_plan(model, applied)
    fewer_bits, _ = uniform(model, "int2-g32-asym")
    r = verify(model, fewer_bits)
    assert not r.ok and {m.field for m in r.mismatches} == {"levels"}
    assert {m.unit for m in r.mismatches} == {"fc1", "fc2", "head"}
    from dataclasses import replace

    wrong_summary = replace(applied, summary=replace(applied.summary, bpw=6.0))
    assert [m.field for m in verify(model, wrong_summary).mismatches] == ["bpw"]
    finer, _ = uniform(model, "int4-g16-asym")  # groups of 16 of a g32 model hold fewer levels
    coarse = verify(model, finer)
    assert {m.field for m in coarse.mismatches} >= {"group_size"}
    more_bits, _ = uniform(model, "int4-g128-asym")  # a 2-bit model claimed as 4-bit
    m6 = Net()
    apply_plan(m6, uniform(m6, "int2-g128-asym")[0])
    assert "bits" in {m.field for m in verify(m6, more_bits).mismatches}
    untouched = Net()
    r3 = verify(untouched, applied, reference={k: v.clone() for k, v in untouched.state_dict().items()})
    assert {m.field for m in r3.mismatches} == {"unchanged", "levels"}
    with pytest.raises(Exception, match="does not match the plan"):
        r.raise_for_mismatch()
    # a module outside the plan that changed is reported too
    part = BitPlan.from_choice(table_for(discover_units(model, include="fc1"), ["int4-g32-asym"]),
                               {"fc1": "int4-g32-asym"})
    with torch.no_grad():
        model.head.weight.add_(1.0)
    r4 = verify(model, part, reference=ref)
    assert [m.unit for m in r4.mismatches if m.field == "modified"] == ["fc2", "head"]


def plan_of(assignments: dict[str, Assignment]) -> BitPlan:
    from allocator.core.plan import PlanSummary

    return BitPlan(assignments=assignments,
                   summary=PlanSummary(params=1, size_bits=1.0, bpw=1.0, predicted_cost=0.0))


@pytest.mark.parametrize(("assignment", "unit", "match"), [
    (Assignment(option="int4-g32-asym", bits=4), "fc9", "'fc9' is not a module"),
    (Assignment(option="int4-g32-asym", bits=4), "fc1.nope", "'fc1.nope' is not a module"),
    (Assignment(option="int9-g32-asym", bits=9), "fc1", "unknown option label 'int9-g32-asym'"),
    (Assignment(option="int4-g32-asym", bits=3), "fc1", "declares 3 bits but option"),
    (Assignment(option="int4-g32-asym", bits=4, group_size=64), "fc1", "declares group_size 64"),
    (Assignment(option="int4-g32-asym", bits=4, symmetric=True), "fc1", "declares symmetric=True"),
    (Assignment(option="iq2_xs", bits=2), "fc1", "codebook GGUF type"),
])
def test_bad_plans(assignment: Assignment, unit: str, match: str) -> None:
    with pytest.raises(InvalidPlanError, match=match):
        apply_plan(Net(), plan_of({unit: assignment}))


def test_bad_plan_against_table_and_overlap() -> None:
    model = Net()
    units = discover_units(model)
    t = table_for(units, ["int4-g32-asym", "fp16"])
    plan, _ = uniform(model, "int3-g32-asym")
    with pytest.raises(InvalidPlanError, match="does not offer"):
        apply_plan(model, plan, table=t)
    both = plan_of({"fc1": Assignment(option="fp16", bits=16),
                    "fc1[g=0]": Assignment(option="fp16", bits=16),
                    "fc1[g=1]": Assignment(option="fp16", bits=16)})
    with pytest.raises(InvalidPlanError, match="cover the same columns"):
        apply_plan(model, both)
    with pytest.raises(InvalidParameterError, match="calibration"):
        apply_plan(model, plan, method="gptq")
    with pytest.raises(InvalidParameterError, match="unknown"):
        apply_plan(model, plan, method="awq")


def _layer_inputs(minilm: Any, batches: list, name: str) -> torch.Tensor:
    xs: list[torch.Tensor] = []
    mod = minilm.model.get_submodule(name)

    def grab(_m: Any, inp: tuple, batch_mask: list = []) -> None:  # noqa: B006
        xs.append(inp[0].detach())
    h = mod.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for b in batches:
                minilm.model(**b)
    finally:
        h.remove()
    rows = [x[b["attention_mask"].bool()] for x, b in zip(xs, batches, strict=True)]
    return torch.cat(rows)


@pytest.mark.parametrize("option", ["int3-g128-asym", "int2-g128-asym"])
def test_gptq_beats_rtn_on_a_minilm_layer(minilm: Any, calib: list, held_out: list, state: Any,
                                          option: str) -> None:
    """Layer output error ‖XWᵀ − XQᵀ‖ on held-out activations: GPTQ well below RTN."""
    name = "encoder.layer.2.intermediate.dense"
    units = discover_units(minilm.model, include=rf"^{name}$")
    t = table_for(units, [option])
    plan = BitPlan.from_choice(t, {name: option})
    w0 = minilm.model.get_submodule(name).weight.detach().clone()
    x = _layer_inputs(minilm, held_out, name)
    apply_plan(minilm.model, plan, method="rtn")
    err_rtn = float((x @ (minilm.model.get_submodule(name).weight.detach() - w0).T).norm())
    minilm.model.load_state_dict(state)
    report = apply_plan(minilm.model, plan, method="gptq", calibration=calib)
    err_gptq = float((x @ (minilm.model.get_submodule(name).weight.detach() - w0).T).norm())
    assert verify(minilm.model, plan).ok
    assert report.info["tokens"] > 100
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
