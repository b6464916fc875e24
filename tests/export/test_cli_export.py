from __future__ import annotations

import json

import yaml

from allocator.cli import main
from allocator.core.units import discover_units

from .conftest import make_plan, random_pick


def test_cli_export_with_model(minilm, tmp_path, capsys) -> None:
    units = discover_units(minilm)
    opts = ["int4-g128-asym", "int8-g128-sym"]
    plan = make_plan(units, opts, random_pick(opts))
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    out = tmp_path / "recipe.yaml"
    assert main(["export", str(plan_path), "--to", "llmcompressor", "-o", str(out), "--model", "minilm"]) == 0
    groups = yaml.safe_load(out.read_text())["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert groups["config_groups"]
    printed = capsys.readouterr().out
    assert "bpw over the" in printed and "wrote" in printed  # weighted with the model's shapes
    assert main(["export", str(plan_path), "--to", "autoround", "--model", "minilm"]) == 0
    assert json.loads((tmp_path / "plan.autoround.json").read_text())


def test_cli_export_errors_are_one_line(minilm, tmp_path, capsys) -> None:
    units = discover_units(minilm, group_columns=128)
    plan = make_plan(units, ["int4-g128-asym"], lambda u, rng: "int4-g128-asym")
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    assert main(["export", str(plan_path), "--to", "gptqmodel"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "column group" in err and "Traceback" not in err
    assert main(["export", str(plan_path), "--to", "hqq", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
