"""The plan's quantizer in refinement and in ``run --method gptq`` (docs/quantizer.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator import Budget  # noqa: E402
from allocator.backend import gptq_quantizer_as_applied  # noqa: E402
from allocator.core.formats import parse_format  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.jobs.refine import RefineConfig, _Weights, refine_plan  # noqa: E402
from allocator.model.quant import RtnQuantizer, gptq_quantizer  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402


class _Counting(RtnQuantizer):
    """RTN that counts its calls per (unit, option)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def quantize(self, unit, weight, fmt):  # type: ignore[no-untyped-def]
        self.calls.append((unit.name, fmt.name))
        return super().quantize(unit, weight, fmt)


def test_weights_requantize_only_the_units_that_move(tiny) -> None:
    units = discover_units(tiny.model)[:6]
    q = _Counting()
    w = _Weights(tiny.model, units, q)
    a = dict.fromkeys((u.name for u in units), "int4-g128-asym")
    w.set_plan(a)
    assert len(q.calls) == 6
    b = {**a, units[1].name: "int2-g128-asym", units[4].name: "int3-g128-asym"}
    w.set_plan(b)
    assert q.calls[6:] == [(units[1].name, "int2-g128-asym"), (units[4].name, "int3-g128-asym")]
    w.restore()
    w.set_plan(b)  # restored to full precision: everything is set again
    assert len(q.calls) == 14


def test_refine_with_gptq_quantizes_each_unit_option_once(tiny, tiny_calib) -> None:
    model = tiny.model
    units = [u for u in discover_units(model) if u.name.startswith("model.layers.0.")]
    opts = [parse_format(o) for o in ("int2-g32-asym", "int3-g32-asym", "int4-g32-asym")]
    q = gptq_quantizer(model, units, tiny_calib, kind="causal_lm")
    ctx = EstimateContext(batches=tiny_calib, units=units, options=opts, model_kind="causal_lm",
                          progress=False, quantizer=q)
    table = get_estimator("salience").estimate(model, ctx)
    after_estimate = q.computed
    assert after_estimate == len(units) * len(opts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = Budget(bpw=3.2)
    plan = BitPlan.from_choice(table, dict.fromkeys(table.units, "int3-g32-asym"))
    res = refine_plan(model, {"uniform": plan}, table, budget, tiny_calib, units, kind="causal_lm",
                      config=RefineConfig(rounds=2, trust=1.0), quantizer=q)
    assert res.rounds and res.error <= res.start_error
    # every (unit, option) refinement asked for was already quantized: no GPTQ run twice
    assert q.computed == after_estimate and set(q.runs.values()) == {1}
    assert q.hits > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _uniform(units, option: str) -> BitPlan:  # type: ignore[no-untyped-def]
    import numpy as np

    from allocator.core.table import CostTable

    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=[option], cost=np.zeros((len(units), 1)),
                                      in_features=[u.in_features for u in units])
    return BitPlan.from_choice(table, dict.fromkeys(table.units, option))


def test_gptq_as_applied_gives_the_backend_s_weights_of_the_reference(tiny, tiny_calib) -> None:
    """Per unit, from the Hessians of the reference plan as applied: exactly the weights
    block-by-block GPTQ gives that plan; from full-precision Hessians, not (later blocks see
    the earlier blocks' quantization error)."""
    from allocator.backend import apply_plan
    from allocator.core.units import unit_weight

    model = tiny.model
    units = discover_units(model)
    fmt = parse_format("int3-g32-asym")
    plan = _uniform(units, fmt.name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = gptq_quantizer_as_applied(model, units, tiny_calib, plan)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    assert "as applied under int3-g32-asym" in repr(q)
    fp = gptq_quantizer(model, units, tiny_calib, kind="causal_lm")
    mine = {u.name: q.quantize(u, unit_weight(model, u).detach().clone(), fmt) for u in units}
    stand_in = {u.name: fp.quantize(u, unit_weight(model, u).detach().clone(), fmt) for u in units}
    try:
        apply_plan(model, plan, method="gptq", calibration=tiny_calib, units=units)
        for u in units:
            torch.testing.assert_close(unit_weight(model, u), mine[u.name], rtol=0, atol=0)
        assert any(not torch.equal(unit_weight(model, u), stand_in[u.name]) for u in units)
    finally:
        model.load_state_dict(before)


def test_applied_choice_takes_the_reference_plan_from_the_quantizer(tiny, tiny_calib,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan the per-unit quantizer was fitted under is not applied again: its weights come
    from the quantizer and measure exactly what the backend's GPTQ of it measures."""
    import allocator.backend as backend
    from allocator.jobs.applied import applied_choice

    model = tiny.model
    units = discover_units(model)
    fit, val = tiny_calib[:1], tiny_calib[1:]
    import numpy as np

    from allocator.core.table import CostTable

    opts = ["int3-g32-asym", "int4-g32-asym"]
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=opts, cost=np.zeros((len(units), 2)),
                                      in_features=[u.in_features for u in units])
    uniform = BitPlan.from_choice(table, dict.fromkeys(table.units, opts[0]))
    mixed = BitPlan.from_choice(table, {u: opts[i % 2] for i, u in enumerate(table.units)})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def restore() -> None:
        model.load_state_dict(before)

    q = gptq_quantizer_as_applied(model, units, fit, uniform)
    assert q.reference == dict(uniform.choice)
    applied: list[dict[str, str]] = []
    real = backend.apply_plan

    def counted(m, plan, **kw):  # type: ignore[no-untyped-def]
        applied.append(dict(plan.choice))
        return real(m, plan, **kw)

    args = dict(kind="causal_lm", method="gptq", fit=fit, validation=val, units=units,
                restore=restore, uniform="uniform ≤")
    plans = {"refined": mixed, "uniform ≤": uniform}
    monkeypatch.setattr(backend, "apply_plan", counted)
    reused = applied_choice(model, plans, **args, quantizer=q)
    assert applied == [dict(mixed.choice)]  # uniform was not applied again
    again = applied_choice(model, plans, **args)
    assert applied[1:] == [dict(mixed.choice), dict(uniform.choice)]
    for label in plans:
        assert reused.candidate(label).error == again.candidate(label).error
        assert reused.candidate(label).metrics == again.candidate(label).metrics
    assert reused.chosen == again.chosen
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_run_tiny_llama_with_gptq_records_the_quantizer(tmp_path: Path) -> None:
    from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec

    spec = run_spec("salience", options="int2-g32-asym,int3-g32-asym,int4-g32-asym", samples=8,
                    seq_len=32, batch_size=4, progress=False)
    run = run_pipeline(RunConfig(model="tiny-llama", method="gptq", bpw=3.25, estimate=spec,
                                 eval_samples=4, refine_rounds=1, out=tmp_path))
    assert run.table.metadata["quantizer"] == "gptq"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quantizer"] == "gptq" and results["config"]["method"] == "gptq"
    # the per-unit GPTQ learns from the uniform plan as the backend applies it
    assert results["data"]["quantizer_inputs"] == "as applied under int2-g32-asym"
    assert run.result.verified


def test_run_tiny_llama_for_llamacpp_uses_ggml_in_every_stage(tmp_path: Path, tiny, tiny_calib) -> None:
    from allocator.backend import apply_plan, verify
    from allocator.core.formats import GGUF_TYPES
    from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec
    from allocator.model.quant import collect_importance, quantize_ggml

    spec = run_spec("salience", samples=8, seq_len=32, batch_size=4, progress=False)
    cfg = RunConfig(model="tiny-llama", consumer="llamacpp", bpw=4.6, estimate=spec, eval_samples=4,
                    refine_rounds=1, out=tmp_path)
    assert cfg.method == "ggml"  # the default for --for llamacpp
    run = run_pipeline(cfg)
    assert run.table.metadata["quantizer"] == "ggml"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quantizer"] == "ggml" and results["config"]["method"] == "ggml"
    assert run.result.verified
    # the backend applies GGUF options with ggml's values, imatrix from the calibration data
    model = tiny.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = run.result.plan
    gguf = {u: a.option for u, a in plan.assignments.items() if a.option in GGUF_TYPES and a.option != "fp16"}
    assert gguf
    linear = [m for m in gguf if isinstance(model.get_submodule(m), torch.nn.Linear)]
    imp = collect_importance(model, linear, tiny_calib, lambda b: model(**b, use_cache=False))
    assert set(imp) == set(linear)
    expected = {m: quantize_ggml(model.get_submodule(m).weight, o, importance=imp.get(m)).values
                for m, o in gguf.items()}
    try:
        apply_plan(model, plan, method="ggml", calibration=tiny_calib)
        assert verify(model, plan).ok
        for m, values in expected.items():
            assert torch.equal(model.get_submodule(m).weight, values.to(model.get_submodule(m).weight.dtype))
    finally:
        model.load_state_dict(state)


def test_cli_estimate_for_llamacpp_forms_costs_with_ggml(tmp_path: Path) -> None:
    from allocator.cli import main
    from allocator.core.table import CostTable

    out = tmp_path / "t.parquet"
    assert main(["estimate", "tiny-llama", "--method", "salience", "--for", "llamacpp", "--samples", "4",
                 "--seq-len", "16", "--no-progress", "-o", str(out)]) == 0
    assert CostTable.load(out).metadata["quantizer"] == "ggml"
    assert main(["estimate", "tiny-llama", "--method", "salience", "--for", "llamacpp", "--samples", "4",
                 "--seq-len", "16", "--quantizer", "rtn", "--no-progress", "-o", str(out)]) == 0
    assert CostTable.load(out).metadata["quantizer"] == "rtn"


def test_run_with_gptq_hands_out_the_plan_the_applied_choice_picked(tmp_path: Path) -> None:
    from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec

    spec = run_spec("salience", options="int2-g32-asym,int3-g32-asym,int4-g32-asym", samples=12,
                    seq_len=32, batch_size=4, progress=False)
    run = run_pipeline(RunConfig(model="tiny-llama", method="gptq", bpw=3.25, estimate=spec,
                                 eval_samples=4, refine_rounds=1, out=tmp_path))
    a = run.applied
    assert a is not None and a.method == "gptq" and a.uniform == "uniform ≤"
    labels = {c.label for c in a.candidates} | {s for c in a.candidates for s in c.same_as}
    assert labels == {"refined", "table optimum", "uniform ≤"}
    chosen = a.candidate(a.chosen)
    assert not chosen.worse_on
    assert chosen.error == min(c.error for c in a.candidates if not c.worse_on)
    handed = json.loads((tmp_path / "plan.json").read_text())
    cands = json.loads((tmp_path / "candidates.json").read_text())
    assert cands["applied_choice"]["chosen"] == a.chosen
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["applied_choice"]["chosen"] == a.chosen
    assert {u: v["option"] for u, v in handed["assignments"].items()} == \
        {u: x.option for u, x in run.result.plan.assignments.items()}
    assert "as `gptq` applies them" in (tmp_path / "report.md").read_text()


def test_run_with_rtn_needs_no_applied_choice(tmp_path: Path) -> None:
    from allocator.jobs.applied import APPLIED_CHECK_METHODS

    assert "rtn" not in APPLIED_CHECK_METHODS and "ggml" not in APPLIED_CHECK_METHODS
