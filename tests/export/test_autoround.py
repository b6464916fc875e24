from __future__ import annotations

import json

import pytest

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan

from .conftest import expected_int, linear_names, make_plan, random_pick
from .consumers import BASE, autoround_expand

OPTS = ["int2-g64-sym", "int4-g128-asym", "int8-ch-sym", "fp16"]


def _resolved(value) -> tuple | None | str:
    if value is BASE:
        return BASE
    if value["bits"] == 16:
        assert value["data_type"] == "float"
        return None
    return value["bits"], value["group_size"], value["sym"]


@pytest.mark.parametrize("model_name", ["llama", "minilm"])
def test_autoround_exact_names(model_name: str, request) -> None:
    model = request.getfixturevalue(model_name)
    all_units = discover_units(model)
    units = all_units[:-1]  # leave the last module (lm_head, pooler.dense) out of the plan
    plan = make_plan(units, OPTS, random_pick(OPTS), seed=5)
    names = linear_names(model)
    for with_model in (True, False):
        res = export_plan(plan, "autoround", model_names=names if with_model else None)
        layer_config = json.loads(res.text)
        assert set(layer_config) <= set(names)  # exact full names only, never regex keys
        got = autoround_expand(layer_config, names)
        for n in names:
            if n in plan.choice:
                assert _resolved(got[n]) == expected_int(plan.choice[n]), n
            else:
                assert _resolved(got[n]) == (None if with_model else BASE), n


def test_autoround_refuses_ggufk_without_lossy(llama) -> None:
    units = discover_units(llama)
    plan = make_plan(units, ["q4_K", "q8_0"], random_pick(["q4_K", "q8_0"]))
    with pytest.raises(ExportError, match="q4_K"):
        export_plan(plan, "autoround")
    res = export_plan(plan, "autoround", lossy=True)  # q4_K → its emulation grid int4-g32-asym
    cfg = json.loads(res.text)
    for n, opt in plan.choice.items():
        want = (4, 32, False) if opt == "q4_K" else (8, 32, True)
        assert _resolved(cfg[n]) == want
    assert all(v == ("q4_K", "int4-g32-asym") for v in res.changed.values())
