from __future__ import annotations

import json

import pytest

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan
from allocator.export._grouping import fused_name

from .conftest import expected_int, linear_names, make_plan, random_pick, shapes_of
from .consumers import BASE, gptqmodel_resolve, vllm_gptq_override

OPTS = ["int4-g64-asym", "int8-g32-sym", "int3-g128-asym", "int4-ch-sym", "fp16"]


@pytest.mark.parametrize("with_model", [True, False])
def test_gptqmodel_every_module_gets_its_setting(llama, with_model: bool) -> None:
    units = [u for u in discover_units(llama) if u.name != "lm_head"]
    plan = make_plan(units, OPTS, random_pick(OPTS), seed=1)
    names = linear_names(llama)
    res = export_plan(plan, "gptqmodel", model_names=names if with_model else None,
                      shapes=shapes_of(llama) if with_model else None)
    cfg = json.loads(res.text)
    assert list(cfg["dynamic"])[:1][0].startswith("-:")  # negatives first on disk, as vLLM needs
    assert all(k[2:].startswith("^") and k.endswith("$") for k in cfg["dynamic"])
    planned = plan.choice
    for name, _ in llama.named_modules():
        got = gptqmodel_resolve(cfg, name)
        if name in planned:
            want = expected_int(planned[name])
            assert got == (want if want is None else (want[0], want[1], want[2])), name
        elif name in names and with_model:
            assert got is None, name  # unplanned linear pinned unquantized (lm_head)
        else:
            assert got in (BASE, None), name  # containers / unplanned: no '+:' rule reaches them
    # vLLM: fused prefixes resolve to the members' shared setting, in file order
    for name in planned:
        fused = fused_name(name)
        if fused:
            assert vllm_gptq_override(cfg, fused) == vllm_gptq_override(cfg, name), fused
    assert cfg["format"] == "gptq"  # 2/3/4/8 bits only
    assert any("gptqmodel accounting" in n and "bpw" in n for n in res.notes)


def test_gptqmodel_six_bits_switch_to_gptq_p(llama) -> None:
    units = discover_units(llama, exclude="lm_head")
    opts = ["int6-g128-sym", "int4-g128-sym"]
    plan = make_plan(units, opts, random_pick(opts))
    res = export_plan(plan, "gptqmodel")
    assert json.loads(res.text)["format"] == "gptq_p"
    assert any("gptq_p" in n for n in res.notes)


def test_gptqmodel_plain_format_and_base(llama) -> None:
    units = discover_units(llama, exclude="lm_head")
    opts = ["int4-g128-sym", "int8-g128-sym"]
    plan = make_plan(units, opts, random_pick(opts))
    cfg = json.loads(export_plan(plan, "gptqmodel", base="int2-g64-asym").text)
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["format"]) == (2, 64, False, "gptq")
    for name, opt in plan.choice.items():
        assert gptqmodel_resolve(cfg, name) == expected_int(opt)


def test_gptqmodel_refuses_split_fused_layer(llama) -> None:
    units = discover_units(llama, exclude="lm_head", fusion=None)
    plan = make_plan(units, ["int4-g128-sym", "int8-g128-sym"],
                     lambda u, rng: "int8-g128-sym" if u.name.endswith("v_proj") else "int4-g128-sym")
    with pytest.raises(ExportError, match="fused layer .*qkv_proj"):
        export_plan(plan, "gptqmodel")
    res = export_plan(plan, "gptqmodel", lossy=True)
    cfg = json.loads(res.text)
    for name in plan.choice:
        if "self_attn" in name and not name.endswith("o_proj"):
            assert gptqmodel_resolve(cfg, name) == (8, 128, True)  # raised to the max
    assert res.changed and any("LOSSY" in n for n in res.notes)


def test_gptqmodel_refuses_codebook_gguf_and_unknown_unit(llama) -> None:
    units = discover_units(llama, exclude="lm_head")
    plan = make_plan(units, ["iq2_xs", "q4_0"], lambda u, rng: "iq2_xs")
    with pytest.raises(ExportError, match="iq2_xs"):
        export_plan(plan, "gptqmodel", lossy=True)
    plan = make_plan(units, ["iq2_xs", "q4_0"], lambda u, rng: "q4_0")  # exact: int4-g32-sym
    cfg = json.loads(export_plan(plan, "gptqmodel").text)
    assert all(gptqmodel_resolve(cfg, n) == (4, 32, True) for n in plan.choice)
    with pytest.raises(ExportError, match="not a module of the model"):
        export_plan(plan, "gptqmodel", model_names=["model.layers.0.mlp.down_proj"])
