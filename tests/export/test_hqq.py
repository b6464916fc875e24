from __future__ import annotations

import json

import pytest

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan

from .conftest import linear_names, make_plan

hqq_base = pytest.importorskip("hqq.models.base")
name_to_linear_tag = hqq_base.name_to_linear_tag

TAG_OPTS = {"self_attn.q_proj": "int4-g64-asym", "self_attn.k_proj": "int4-g64-asym",
            "self_attn.v_proj": "int8-g32-asym", "self_attn.o_proj": "fp16",
            "mlp.gate_proj": "int3-g128-asym", "mlp.up_proj": "int2-ch-asym",
            "mlp.down_proj": "int5-g64-asym"}


def _hqq_settings(model, quant_config: dict) -> dict:
    """``BaseHQQModel.quantize_model``: tags of Linear layers (lm_head ignored); if any key is a
    tag, tags without a key get None; each layer takes its tag's config."""
    linear = [n for n in linear_names(model) if n.split(".")[-1] != "lm_head"]
    tags = {name_to_linear_tag(n) for n in linear}
    assert any(k in tags for k in quant_config)
    patch = {t: None for t in tags}
    patch.update(quant_config)
    return {n: patch[name_to_linear_tag(n)] for n in linear}


def test_hqq_per_tag_plan(llama) -> None:
    units = discover_units(llama, exclude="lm_head")
    plan = make_plan(units, sorted(set(TAG_OPTS.values())),
                     lambda u, rng: TAG_OPTS[name_to_linear_tag(u.name)])
    res = export_plan(plan, "hqq", model_names=linear_names(llama))
    cfg = json.loads(res.text)
    for n, got in _hqq_settings(llama, cfg).items():
        opt = plan.choice[n]
        if opt == "fp16":
            assert got is None, n
        else:
            bits, group = int(opt[3]), opt.split("-")[1]
            assert got == {"nbits": bits, "group_size": None if group == "ch" else int(group[1:])}, n
    assert any("hqq accounting" in n for n in res.notes)


def test_hqq_refuses_per_layer_plans_and_bits(llama) -> None:
    units = discover_units(llama, exclude="lm_head")
    per_layer = make_plan(units, ["int4-g64-asym", "int8-g64-asym"],
                          lambda u, rng: "int8-g64-asym" if ".layers.0." in u.name else "int4-g64-asym")
    with pytest.raises(ExportError, match="one setting per linear tag"):
        export_plan(per_layer, "hqq")
    res = export_plan(per_layer, "hqq", lossy=True)
    assert all(v == {"nbits": 8, "group_size": 64} for v in json.loads(res.text).values())
    seven = make_plan(units, ["int7-g64-asym"], lambda u, rng: "int7-g64-asym")
    with pytest.raises(ExportError, match="7 bits"):
        export_plan(seven, "hqq")
    sym = make_plan(units, ["int4-g64-sym"], lambda u, rng: "int4-g64-sym")
    with pytest.raises(ExportError, match="symmetric"):
        export_plan(sym, "hqq")
    head = make_plan(discover_units(llama), ["int4-g64-asym"], lambda u, rng: "int4-g64-asym")
    with pytest.raises(ExportError, match="lm_head"):
        export_plan(head, "hqq")
    # a plan over some layers only: HQQ would quantize the rest of each tag too
    part = make_plan([u for u in units if ".layers.0." in u.name], ["int4-g64-asym"],
                     lambda u, rng: "int4-g64-asym")
    with pytest.raises(ExportError, match="not in the plan"):
        export_plan(part, "hqq", model_names=linear_names(llama))
