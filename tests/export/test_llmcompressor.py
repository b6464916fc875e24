from __future__ import annotations

import copy

import pytest
import yaml

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan

from .conftest import expected_int, make_plan, random_pick, shapes_of

ct_q = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.utils import match_name  # noqa: E402

OPTS = ["int4-g64-asym", "int8-g32-sym", "int2-g64-asym", "int6-ch-sym", "fp16"]
VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _config(text: str) -> QuantizationConfig:
    recipe = yaml.safe_load(text)
    groups = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]
    return QuantizationConfig(config_groups={
        name: QuantizationScheme(targets=g["targets"], weights=QuantizationArgs(**g["weights"]))
        for name, g in groups.items()})


def _check(model, plan, text: str) -> None:
    cfg = _config(text)
    m = copy.deepcopy(model)
    apply_quantization_config(m, cfg, show_progress=False)  # compressed-tensors' own matching
    planned = plan.choice
    for name, module in m.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        want = expected_int(planned[name]) if name in planned else None
        if want is None:
            assert scheme is None, name
            continue
        w = scheme.weights
        group = -1 if w.strategy == "channel" else w.group_size
        assert (w.num_bits, group, w.symmetric, w.type) == (*want, "int"), name


def test_llmcompressor_groups_match_exactly_with_compressed_tensors(llama) -> None:
    units = [u for u in discover_units(llama) if u.name != "model.layers.1.mlp.down_proj"]
    plan = make_plan(units, OPTS, random_pick(OPTS), seed=3)
    res = export_plan(plan, "llmcompressor", model_names=[u.name for u in discover_units(llama)],
                      shapes=shapes_of(llama))
    assert "'re:^" in res.text and '"re:' not in res.text  # single-quoted YAML, anchored
    assert not any(k in res.text for k in ("W4A16", "W8A16", "preset"))
    _check(llama, plan, res.text)
    # targets are disjoint: no module matches two groups (safe under first-wins and merge rules)
    cfg = _config(res.text)
    targets = [t for g in cfg.config_groups.values() for t in g.targets]
    for name, _ in llama.named_modules():
        assert sum(match_name(name, t) for t in targets) <= 1, name
    # vLLM fused layers: shards share one group (match_name with the fused mapping)
    for i in range(len(llama.model.layers)):
        for fused, leaf in (("self_attn", "qkv_proj"), ("mlp", "gate_up_proj")):
            fname = f"model.layers.{i}.{fused}.{leaf}"
            hits = {gname for gname, g in cfg.config_groups.items()
                    if any(match_name(fname, t, VLLM_FUSED) for t in g.targets)}
            shard = f"model.layers.{i}.{fused}.{VLLM_FUSED[leaf][0]}"
            assert (plan.choice[shard] == "fp16") == (not hits) and len(hits) <= 1


def test_llmcompressor_minilm_bert_names(minilm) -> None:
    units = discover_units(minilm)
    plan = make_plan(units, OPTS[:4], random_pick(OPTS[:4]), seed=4)
    _check(minilm, plan, export_plan(plan, "llmcompressor").text)


def test_llmcompressor_refusals(llama) -> None:
    units = discover_units(llama, group_columns=64)
    opts = ["int4-g64-asym", "int8-g64-asym"]
    plan = make_plan(units, opts, random_pick(opts))
    with pytest.raises(ExportError, match=r"column group"):
        export_plan(plan, "llmcompressor")
    lossy = export_plan(plan, "llmcompressor", lossy=True)
    assert lossy.changed  # each module raised to its groups' highest setting
    units = discover_units(llama)
    plan = make_plan(units, ["fp16", "int4-g64-asym"], lambda u, rng: "fp16")
    with pytest.raises(ExportError, match="nothing to quantize"):
        export_plan(plan, "llmcompressor")
    with pytest.raises(ExportError, match="takes no base"):
        export_plan(plan, "llmcompressor", base="int4-g128-sym")
