"""Sequential (block-by-block) mode on the tiny LM: the driver reproduces the model, GPTQ applied
block by block equals the whole-model GPTQ apply, and parameter memory stays at non-block + one block."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from allocator.backend import apply_plan, apply_plan_sequential  # noqa: E402
from allocator.core.errors import InvalidParameterError, ModelError  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.loading import load_model, tiny_lm_path  # noqa: E402
from allocator.model.sequential import SequentialModel, materialised_params  # noqa: E402

OPTIONS = ["int4-g32-asym", "int3-g32-sym", "int8-ch-sym"]


def mixed_plan(model: Any, group_columns: int | None = None) -> tuple[BitPlan, list[Any]]:
    units = discover_units(model, group_columns=group_columns)
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=OPTIONS, cost=[[0.0] * len(OPTIONS)] * len(units),
                                      in_features=[u.in_features for u in units])
    choice = {u: OPTIONS[i % len(OPTIONS)] for i, u in enumerate(table.units)}
    return BitPlan.from_choice(table, choice), units


def test_driver_reproduces_the_logits_with_one_block_in_memory(tiny: Any, tiny_calib: list) -> None:
    seq = SequentialModel(tiny_lm_path())
    per_block = sum(p.numel() for p in tiny.model.model.layers[0].parameters())
    total = materialised_params(tiny.model)
    assert seq.nonblock_params == total - 4 * per_block
    seen = []
    for step in seq.steps(tiny_calib):
        seen.append(materialised_params(seq.model))
        assert all(materialised_params(seq.blocks[j]) == 0 for j in range(4) if j != step.index)
    assert seen == [seq.nonblock_params + per_block] * 4
    assert seq.peak_params == seq.nonblock_params + per_block
    assert materialised_params(seq.model) == seq.nonblock_params  # every block released
    head = seq.head()
    assert head is not None
    with torch.no_grad():
        for batch, x in zip(tiny_calib, seq.head_inputs(), strict=True):
            ref = tiny.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
            torch.testing.assert_close(head(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_columns", [None, 64])
def test_sequential_gptq_equals_whole_model_gptq(tiny_calib: list, tmp_path: Path,
                                                 group_columns: int | None) -> None:
    model = load_model("tiny-llama").model  # a private copy: apply_plan quantizes in place
    plan, units = mixed_plan(model, group_columns)
    whole = apply_plan(model, plan, method="gptq", calibration=tiny_calib, units=units)
    seq = apply_plan_sequential(tiny_lm_path(), plan, calibration=tiny_calib, units=units,
                                keep_weights=True, save_dir=tmp_path / "q")
    modules = {u.module for u in units}
    assert set(seq.weights) == modules and "lm_head" in modules
    for name in modules:
        torch.testing.assert_close(seq.weights[name], model.get_submodule(name).weight.detach(),
                                   rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(whole.units, seq.report.units, strict=True):
        assert (a.unit, a.option, a.params) == (b.unit, b.option, b.params)
        assert b.rel_error == pytest.approx(a.rel_error, rel=1e-4)
    assert seq.report.size_bits == pytest.approx(whole.size_bits)
    assert seq.report.info["stages"] == whole.info["stages"] == 5
    assert seq.report.info["tokens"] == whole.info["tokens"]
    for name, loss in whole.info["gptq_loss"].items():
        assert seq.report.info["gptq_loss"][name] == pytest.approx(loss, rel=1e-3)
    assert seq.peak_params == seq.nonblock_params + seq.max_block_params

    # the saved directory is a sharded checkpoint with the quantized weights
    out = tmp_path / "q"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # 4 blocks + the rest
    again = load_model(out).model
    for name, p in model.named_parameters():
        torch.testing.assert_close(again.get_parameter(name), p.detach(), rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_sharded_checkpoint_loads_block_by_block(tiny: Any, tiny_calib: list, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    seq = SequentialModel(tmp_path)
    n = sum(1 for _ in seq.steps(tiny_calib[:1]))
    assert n == 4
    head = seq.head()
    assert head is not None
    with torch.no_grad():
        ref = tiny.model(input_ids=tiny_calib[0]["input_ids"], attention_mask=tiny_calib[0]["attention_mask"],
                         use_cache=False).logits
        torch.testing.assert_close(head(seq.head_inputs()[0]), ref, rtol=1e-5, atol=1e-5)


def test_sequential_refusals(tmp_path: Path, tiny_calib: list) -> None:
    plan, units = mixed_plan(load_model("tiny-llama").model)
    with pytest.raises(InvalidParameterError, match="calibration"):
        apply_plan_sequential(tiny_lm_path(), plan, calibration=[], keep_weights=True)
    with pytest.raises(InvalidParameterError, match="save_dir"):
        apply_plan_sequential(tiny_lm_path(), plan, calibration=tiny_calib)
    (tmp_path / "config.json").write_text((tiny_lm_path() / "config.json").read_text())
    with pytest.raises(ModelError, match="safetensors"):
        SequentialModel(tmp_path)
