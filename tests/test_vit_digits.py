"""The bundled ViT digits classifier: offline load, held-out accuracy, disjoint splits, every
estimator on image batches, apply + verify + evaluate round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from allocator.backend import apply_plan, evaluate, reference_outputs, verify  # noqa: E402
from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.data import CalibrationData, DigitsData, data_for  # noqa: E402
from allocator.model.data.images import (  # noqa: E402
    DIGITS_SPLITS,
    PIXEL_MEAN,
    PIXEL_STD,
    digits_split_indices,
    load_digits_arrays,
)
from allocator.model.loading import (  # noqa: E402
    LoadedModel,
    ModelKind,
    detect_kind,
    load_model,
    model_fingerprint,
    vit_digits_path,
)
from sensitivity import ESTIMATORS, EstimateContext, EstimateSpec, estimate, get_estimator  # noqa: E402

OPTIONS = "int2-g32-asym,int4-g32-asym,int8-g32-asym"


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    return load_model("vit-digits")


@pytest.fixture(scope="module")
def training() -> dict[str, object]:
    data: dict[str, object] = json.loads((vit_digits_path() / "training.json").read_text())
    return data


def test_loads_offline_as_a_classifier_without_tokenizer(vit: LoadedModel) -> None:
    assert vit.kind is ModelKind.CLASSIFIER and vit.name == "vit-digits"
    assert vit.tokenizer is None and not vit.model.training
    assert Path(vit.path) == vit_digits_path()
    assert vit.fingerprint == model_fingerprint(vit.model) and len(vit.fingerprint) == 64
    config = json.loads((vit_digits_path() / "config.json").read_text())
    assert detect_kind(config) is ModelKind.CLASSIFIER
    assert (vit_digits_path() / "model.safetensors").stat().st_size < 2_000_000


def test_units_are_the_linear_layers_head_included(vit: LoadedModel) -> None:
    units = discover_units(vit.model)
    linear = [n for n, m in vit.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [u.name for u in units] == linear and len(units) >= 24
    assert units[-1].name == "classifier"  # included, as tiny-llama's lm_head is


def test_held_out_accuracy_matches_training_json(vit: LoadedModel,
                                                 training: dict[str, object]) -> None:
    ev = DigitsData.from_split("evaluation", batch_size=128)
    correct = 0
    with torch.inference_mode():
        for b in ev:
            correct += int((vit.model(pixel_values=b["pixel_values"]).logits.argmax(-1)
                            == b["labels"]).sum())
    acc = correct / ev.n_samples
    recorded = training["accuracy"]
    assert isinstance(recorded, dict)
    assert acc >= 0.9 and abs(acc - recorded["evaluation"]) <= 0.02


def test_splits_are_disjoint_and_cover_the_data(training: dict[str, object]) -> None:
    parts = {s: set(digits_split_indices(s)) for s in DIGITS_SPLITS}
    images, _ = load_digits_arrays()
    assert sum(len(p) for p in parts.values()) == len(images) == 1797
    assert set.union(*parts.values()) == set(range(len(images)))
    assert not (parts["train"] & parts["calibration"]) and not (parts["train"] & parts["evaluation"])
    assert not (parts["calibration"] & parts["evaluation"])
    split = training["split"]
    assert isinstance(split, dict)
    assert split["sizes"] == {s: len(p) for s, p in parts.items()}
    cal = DigitsData.from_split("calibration", n_samples=40, batch_size=16, seed=3)
    assert set(cal.indices) <= parts["calibration"] and len(set(cal.indices)) == 40
    # the fixed normalisation is the train split's statistics (rounded) and what training used
    x = torch.as_tensor(images[sorted(parts["train"])], dtype=torch.float64) / 16
    assert abs(float(x.mean()) - PIXEL_MEAN) < 1e-4 and abs(float(x.std()) - PIXEL_STD) < 1e-3
    assert training["normalization"] == {"scale": "pixel / 16", "mean": PIXEL_MEAN, "std": PIXEL_STD}


def test_digits_data_has_the_calibration_data_interface() -> None:
    d = DigitsData.from_split("calibration", n_samples=20, batch_size=8, seed=0)
    assert d.n_samples == 20 and len(d) == 3 and [b["labels"].shape[0] for b in d] == [8, 8, 4]
    b = d[0]
    assert b["pixel_values"].shape == (8, 1, 8, 8) and b["pixel_values"].dtype == torch.float32
    assert b["labels"].dtype == torch.long
    again = DigitsData.from_split("calibration", n_samples=20, batch_size=8, seed=0)
    other = DigitsData.from_split("calibration", n_samples=20, batch_size=8, seed=1)
    assert d.fingerprint == again.fingerprint != other.fingerprint
    meta = d.metadata()
    assert meta["fingerprint"] == d.fingerprint and meta["split"] == "calibration"
    json.dumps(meta)
    assert d.to("cpu").fingerprint == d.fingerprint
    whole = DigitsData.from_split("evaluation", n_samples=10_000)
    assert whole.n_samples == len(digits_split_indices("evaluation"))
    with pytest.raises(InvalidParameterError, match="split 'test'"):
        DigitsData.from_split("test")
    with pytest.raises(InvalidParameterError, match="batch_size"):
        DigitsData.from_split("calibration", batch_size=0)


def test_data_for_picks_images_or_text(vit: LoadedModel) -> None:
    d = data_for(vit, "evaluation", 12, seq_len=32, batch_size=4, seed=0)
    assert isinstance(d, DigitsData) and d.split == "evaluation" and d.n_samples == 12
    lm = load_model("tiny-llama")
    t = data_for(lm, "calibration", 4, seq_len=32, batch_size=2, seed=0)
    assert isinstance(t, CalibrationData) and t.pack and t.seq_len == 32


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_gives_a_valid_table_on_image_batches(vit: LoadedModel, name: str) -> None:
    cal = DigitsData.from_split("calibration", n_samples=8, batch_size=4, seed=0)
    units = discover_units(vit.model, include=r"layers\.3\.|classifier")
    opts = parse_options(OPTIONS)
    ctx = EstimateContext(batches=list(cal), units=units, options=opts, seed=0,
                          model_kind=vit.kind, progress=False)
    before = model_fingerprint(vit.model)
    table = get_estimator(name).estimate(vit.model, ctx, metadata={"data": cal.fingerprint})
    assert isinstance(table, CostTable)
    assert table.n_units == len(units) == 7 and set(table.df["option"]) == {o.name for o in opts}
    cost = table.df["cost"].to_numpy()
    assert all(math.isfinite(c) and c >= 0 for c in cost) and cost.max() > 0
    # fewer bits never predicted cheaper for the same unit (int2 ≥ int8) on most units
    wide = table.df.pivot(index="unit", columns="option", values="cost")
    assert (wide["int2-g32-asym"] >= wide["int8-g32-asym"]).mean() >= 0.8
    assert model_fingerprint(vit.model) == before  # estimation leaves the weights as they were


def test_driver_estimates_vit_digits_on_its_calibration_images() -> None:
    table = estimate("vit-digits", EstimateSpec(method="salience", options=OPTIONS, samples=8,
                                                batch_size=4, progress=False))
    assert table.n_units >= 24
    data = table.metadata["data"]
    assert data["source"] == "sklearn.datasets.load_digits:calibration" and data["n_samples"] == 8


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_uniform_int4_apply_verify_evaluate_round_trip(vit: LoadedModel, method: str) -> None:
    cal = DigitsData.from_split("calibration", n_samples=64, batch_size=32, seed=0)
    ev = DigitsData.from_split("evaluation", batch_size=128)
    units = discover_units(vit.model)
    ctx = EstimateContext(batches=[], units=units, options=parse_options(OPTIONS), seed=0,
                          model_kind=vit.kind, progress=False)
    table = get_estimator("datafree").estimate(vit.model, ctx, metadata={})
    plan = BitPlan.from_choice(table, dict.fromkeys(table.units, "int4-g32-asym"))
    state = {k: v.detach().clone() for k, v in vit.model.state_dict().items()}
    ref = reference_outputs(vit.model, list(ev), kind=vit.kind, model_fingerprint=vit.fingerprint)
    fp = evaluate(vit.model, list(ev), ref)
    try:
        report = apply_plan(vit.model, plan, method=method, calibration=list(cal), units=units)
        assert len(report.units) == len(units)
        check = verify(vit.model, plan, units=units)
        assert check.ok, check.mismatches
        q = evaluate(vit.model, list(ev), ref)
    finally:
        vit.model.load_state_dict(state)
    assert fp.metrics["kl"] == 0 and fp.metrics["agreement"] == 1
    assert q.kind == "classifier" and q.error_metric == "kl" and q.n_samples == ev.n_samples
    assert 0 < q.error < 0.05 and q.metrics["agreement"] >= 0.95
    assert abs(q.metrics["accuracy"] - fp.metrics["accuracy"]) <= 0.03
    assert vit.fingerprint == model_fingerprint(vit.model)
