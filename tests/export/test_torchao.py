from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pytest

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan, write_export

from .conftest import expected_int, linear_names, make_plan, random_pick, shapes_of
from .consumers import BASE, torchao_resolve

OPTS = ["int4-g32-sym", "int3-g64-asym", "int8-ch-sym", "fp16"]


def _fake_torchao() -> types.ModuleType:
    """Stand-ins for the torchao names the snippet uses (torchao is not installed here): they
    record their arguments, so running the snippet shows exactly what torchao would receive."""

    @dataclass
    class IntxWeightOnlyConfig:
        weight_dtype: Any
        granularity: Any
        mapping_type: Any

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
    mod.quantize_ = lambda model, config, filter_fn=BASE: calls.append(
        {"config": config, "filter_fn": filter_fn})
    return mod


def _as_tuple(cfg: Any) -> tuple | None:
    if cfg is None:
        return None
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
