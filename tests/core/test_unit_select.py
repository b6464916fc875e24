"""Units in the budget: --include/--exclude globs and units that cannot affect the output."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.units import discover_units, get_module  # noqa: E402
from allocator.model.data import data_for  # noqa: E402
from allocator.model.loading import LoadedModel, load_model, model_forward_outputs  # noqa: E402
from allocator.model.unit_select import (  # noqa: E402
    REASON_INERT,
    filter_units,
    inert_units,
    select_units,
)


def _batch(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return next(iter(data_for(loaded, "calibration", 2, seq_len=16, batch_size=2)))


def _changes_output(loaded: LoadedModel, batch: dict[str, torch.Tensor], module: str) -> bool:
    """Zero the module's weight: does the measured output move? (the slow, direct check)"""
    w = get_module(loaded.model, module).weight
    assert isinstance(w, torch.Tensor)
    keep = w.detach().clone()
    with torch.no_grad():
        ref = model_forward_outputs(loaded, batch)
        w.zero_()
        out = model_forward_outputs(loaded, batch)
        w.copy_(keep)
    return not torch.equal(ref, out)


def test_minilm_pooler_is_inert_and_nothing_else() -> None:
    lm = load_model("minilm")
    batch = _batch(lm)
    assert inert_units(lm, batch) == ["pooler.dense"]
    assert not _changes_output(lm, batch, "pooler.dense")
    assert _changes_output(lm, batch, "encoder.layer.0.attention.self.query")
    sel = select_units(lm, discover_units(lm.model), batch=batch)
    assert len(sel.units) == 36 and sel.excluded == {"pooler.dense": REASON_INERT}


def test_tiny_llama_has_no_inert_unit() -> None:
    lm = load_model("tiny-llama")
    assert inert_units(lm, _batch(lm)) == []


def test_globs_include_exclude_and_typos() -> None:
    units = discover_units(load_model("tiny-llama").model)
    sel = filter_units(units, include=["model.layers.1.*"], exclude=["*.o_proj", "*.mlp.up_proj"])
    assert [u.name for u in sel.units] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.down_proj"]
    assert sel.excluded["lm_head"] == "not matched by --include"
    assert sel.excluded["model.layers.1.self_attn.o_proj"] == "matched by --exclude"
    with pytest.raises(InvalidParameterError, match="matches no unit"):
        filter_units(units, exclude=["model.layer.1.*"])
    with pytest.raises(InvalidParameterError, match="leave no unit"):
        filter_units(units, include=["lm_head"], exclude=["lm_*"])
