from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import pytest

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan, write_export

from .conftest import expected_int, linear_names, make_plan, random_pick, shapes_of
from .consumers import BASE, torchao_resolve

OPTS = ["int4-g32-sym", "int3-g64-asym", "int8-ch-sym", "int4-g64-asym", "int4-g32-asym", "fp16"]


def _fake_torchao() -> types.ModuleType:
    """Stand-ins for the torchao names the snippet uses (torchao is not installed here): they
    record their arguments, so running the snippet shows exactly what torchao would receive."""

    @dataclass
    class IntxWeightOnlyConfig:
        weight_dtype: Any
        granularity: Any
        mapping_type: Any

    @dataclass
    class Int4WeightOnlyConfig:
        group_size: int = 128

    @dataclass
    class PerGroup:
        group_size: int

    @dataclass
    class PerAxis:
        axis: int

    class MappingType(Enum):
        SYMMETRIC = 1
        ASYMMETRIC = 2

    @dataclass
    class FqnToConfig:
        fqn_to_config: dict

    calls: list[dict] = []
    mod = types.ModuleType("torchao.quantization")
    mod.IntxWeightOnlyConfig, mod.PerGroup, mod.PerAxis = IntxWeightOnlyConfig, PerGroup, PerAxis
    mod.MappingType, mod.FqnToConfig, mod.calls = MappingType, FqnToConfig, calls
    mod.Int4WeightOnlyConfig = Int4WeightOnlyConfig
    mod.quantize_ = lambda model, config, filter_fn=BASE: calls.append(
        {"config": config, "filter_fn": filter_fn})
    return mod


def _as_tuple(cfg: Any) -> tuple | None:
    if cfg is None:
        return None
    if type(cfg).__name__ == "Int4WeightOnlyConfig":  # torchao's int4 is asymmetric only
        return 4, cfg.group_size, False
    import torch

    bits = {getattr(torch, f"int{b}"): b for b in range(1, 9)}[cfg.weight_dtype]
    group = -1 if type(cfg.granularity).__name__ == "PerAxis" else cfg.granularity.group_size
    if group == -1:
        assert cfg.granularity.axis == 0
    return bits, group, cfg.mapping_type.name == "SYMMETRIC"


@pytest.mark.parametrize("model_name", ["llama", "minilm"])
def test_torchao_snippet_and_json(model_name: str, request, tmp_path, monkeypatch) -> None:
    model = request.getfixturevalue(model_name)
    units = discover_units(model)[:-1]
    plan = make_plan(units, OPTS, random_pick(OPTS), seed=9)
    paths = write_export(plan, "torchao", tmp_path / "plan.py", model_names=linear_names(model),
                         shapes=shapes_of(model))
    assert [p.suffix for p in paths] == [".py", ".json"]
    fake = _fake_torchao()
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    ns: dict[str, Any] = {}
    exec(compile(paths[0].read_text(), str(paths[0]), "exec"), ns)
    ns["apply"](model)
    (call,) = fake.calls
    assert call["filter_fn"] is None
    mapping = call["config"].fqn_to_config
    assert all(not k.startswith("re:") and k != "_default" for k in mapping)
    desc = json.loads(paths[1].read_text())
    assert desc["quantize_kwargs"] == {"filter_fn": None}
    for name, module in model.named_modules():
        got = torchao_resolve(mapping, name, [p for p, _ in module.named_parameters(recurse=False)])
        if name in plan.choice:
            want = expected_int(plan.choice[name])
            assert _as_tuple(got) == want, name
            d = desc["fqn_to_config"][name]
            assert (d is None) == (want is None)
        else:
            assert got is BASE, name  # no key: torchao leaves it alone


def test_torchao_refuses_non_dividing_groups(llama) -> None:
    units = discover_units(llama)
    plan = make_plan(units, ["int4-g96-sym"], lambda u, rng: "int4-g96-sym")
    with pytest.raises(ExportError, match="not a multiple of group size 96"):
        export_plan(plan, "torchao", shapes=shapes_of(llama))


def test_torchao_packs_int4_where_it_can(llama) -> None:
    """int4 asymmetric at group 32/64/128/256 → Int4WeightOnlyConfig (4 + 32/g); int4 at any
    other group or symmetric → IntxWeightOnlyConfig (unpacked int8: 8 + 16/g (+16/g))."""
    from allocator.core.formats import parse_format
    from allocator.export import int_setting
    from allocator.export.torchao import int4_packed, torchao_bpw

    units = discover_units(llama)
    picks = {"int4-g128-asym": 4.25, "int4-g256-asym": 4.125, "int4-g64-sym": 8.25,
             "int4-g16-asym": 10.0, "int4-ch-asym": None}
    for option, bpw in picks.items():
        fmt = parse_format(option)
        s = int_setting(fmt.bits, fmt.group_size or -1, fmt.symmetric)
        assert int4_packed(s) == (option in ("int4-g128-asym", "int4-g256-asym")), option
        if bpw is not None:
            assert torchao_bpw(s, (64, 512)) == pytest.approx(bpw), option
            if int4_packed(s):  # packed int4 costs what bitalloc's catalogue says
                assert bpw == pytest.approx(fmt.bits_per_weight(512))
    plan = make_plan(units, ["int4-g128-asym"], lambda u, rng: "int4-g128-asym")
    out = export_plan(plan, "torchao", shapes=shapes_of(llama))
    assert "Int4WeightOnlyConfig(group_size=128)" in out.text
    assert "IntxWeightOnlyConfig" not in out.text and "PerGroup" not in out.text  # unused names
    assert any("bfloat16" in n for n in out.notes)
    assert any("4.2500 bpw over" in n for n in out.notes), out.notes
    desc = json.loads(out.files[".json"])["fqn_to_config"]
    assert set(map(json.dumps, desc.values())) == {json.dumps(
        {"config": "Int4WeightOnlyConfig", "group_size": 128})}


def test_a_torchao_palette_plan_exports_exactly() -> None:
    """A plan solved on a ``--for torchao`` table exports without --lossy, and torchao's own bpw
    is the plan's (int4 packed options included)."""
    import solvers
    from allocator.core.budget import Budget
    from allocator.core.table import CostTable
    from allocator.export import model_info
    from allocator.export.palettes import apply_palette, palette_for

    info = model_info("tiny-llama")
    units = sorted(info.shapes)
    options = list(palette_for("torchao").options)
    rng = np.random.default_rng(0)
    cost = [[float(rng.uniform(0.5, 1.0)) * 2.0 ** -parse_bits(o) for o in options] for _ in units]
    table = CostTable.from_unit_costs(
        units=units, params=[info.shapes[u][0] * info.shapes[u][1] for u in units],
        options=options, cost=cost, in_features=[info.shapes[u][1] for u in units])
    table = apply_palette(table, "torchao", shapes=info.shapes)
    assert any(o.startswith("int4-") for o in table.options)
    plan = solvers.solve(table, Budget(bpw=4.6)).plan
    assert plan is not None and any(o.startswith("int4-") for o in plan.choice.values())
    out = export_plan(plan, "torchao", model_names=info.names, shapes=info.shapes)
    assert not out.changed
    reported = next(float(n.split(": ")[-1].split(" bpw")[0].split()[-1]) for n in out.notes
                    if "bpw over the" in n)
    assert reported == pytest.approx(plan.summary.bpw, abs=1e-4)


def parse_bits(option: str) -> int:
    return 16 if option == "fp16" else int(option[3])
