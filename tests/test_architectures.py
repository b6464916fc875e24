"""Common Hugging Face architectures end to end on tiny random configs (hidden 64, 2 layers):
units (GPT-2's transposed ``Conv1D`` included), an estimate, a plan applied with RTN (GPTQ for
GPT-2) that ``verify`` accepts, and Conv1D giving the same costs as the equivalent ``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import solvers  # noqa: E402
from allocator.backend import apply_plan, apply_plan_sequential, verify  # noqa: E402
from allocator.core.budget import Budget  # noqa: E402
from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.units import UnitKind, discover_units, unit_weight  # noqa: E402
from allocator.export import model_info  # noqa: E402
from allocator.model.data import CalibrationData, data_for  # noqa: E402
from allocator.model.loading import LoadedModel, default_model_path, load_model, tiny_lm_path  # noqa: E402
from sensitivity import EstimateSpec, estimate  # noqa: E402

H, LAYERS = 64, 2
LM = dict(num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=128)


def _configs() -> dict[str, tuple[Callable[[], Any], str, str, int]]:
    """name → (config factory, model class, tokenizer ("lm" / "encoder" / "image": none), units)."""
    t = transformers
    return {
        # 4 Conv1D per block + lm_head
        "gpt2": (lambda: t.GPT2Config(n_embd=H, n_layer=LAYERS, n_head=4, n_positions=128),
                 "GPT2LMHeadModel", "lm", 4 * LAYERS + 1),
        "opt": (lambda: t.OPTConfig(hidden_size=H, ffn_dim=128, word_embed_proj_dim=H, **LM),
                "OPTForCausalLM", "lm", 6 * LAYERS + 1),
        "qwen2": (lambda: t.Qwen2Config(hidden_size=H, intermediate_size=128, num_key_value_heads=2, **LM),
                  "Qwen2ForCausalLM", "lm", 7 * LAYERS + 1),
        "bloom": (lambda: t.BloomConfig(hidden_size=H, n_layer=LAYERS, n_head=4),
                  "BloomForCausalLM", "lm", 4 * LAYERS + 1),
        "distilbert": (lambda: t.DistilBertConfig(dim=H, n_layers=LAYERS, n_heads=4, hidden_dim=128,
                                                  max_position_embeddings=128),
                       "DistilBertModel", "encoder", 6 * LAYERS),
        # 8×8 grey images: the built-in digits data (6 per block + classifier)
        "vit": (lambda: t.ViTConfig(hidden_size=H, intermediate_size=128, image_size=8, patch_size=2,
                                    num_channels=1, num_labels=10, bitalloc_data="sklearn-digits",
                                    **{k: v for k, v in LM.items() if k != "max_position_embeddings"}),
                "ViTForImageClassification", "image", 6 * LAYERS + 1),
    }


def _build(root: Path, name: str) -> Path:
    factory, cls_name, tok_kind, _ = _configs()[name]
    cfg = factory()
    tok = None if tok_kind == "image" else transformers.AutoTokenizer.from_pretrained(
        tiny_lm_path() if tok_kind == "lm" else default_model_path())
    if tok is not None:
        cfg.vocab_size = len(tok)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tok, key, None) is not None:
                setattr(cfg, key, getattr(tok, key))
    torch.manual_seed(0)
    path = root / name
    getattr(transformers, cls_name)(cfg).save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(_configs()))
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LoadedModel]:
    torch.set_num_threads(1)
    return request.param, load_model(_build(tmp_path_factory.mktemp("arch"), request.param))


def _calibration(loaded: LoadedModel) -> CalibrationData:
    return CalibrationData.from_corpus(loaded.tokenizer, n_samples=4, seq_len=24, batch_size=4)


def _estimate(loaded: LoadedModel, method: str = "gauss-newton", **kw: Any) -> Any:
    return estimate(loaded, EstimateSpec(method=method, samples=4, seq_len=24, batch_size=4,
                                         progress=False,
                                         options=["int2-g32-asym", "int4-g32-asym", "int8-g32-asym"],
                                         **kw))


def test_units_estimate_apply_verify(arch: tuple[str, LoadedModel]) -> None:
    name, loaded = arch
    model = loaded.model
    units = discover_units(model)
    assert len(units) == _configs()[name][3]
    assert all(u.kind is UnitKind.LINEAR and u.params == math.prod(u.shape) for u in units)
    table = _estimate(loaded)
    cost = table.df["cost"].to_numpy()
    assert set(table.units) == {u.name for u in units}
    assert (cost >= 0).all() and (cost < float("inf")).all() and cost.max() > 0
    plan = solvers.solve(table, Budget(bpw=4.0)).plan
    assert plan is not None
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        apply_plan(model, plan, units=units)
        report = verify(model, plan, reference=reference, units=units)
        assert report.ok, report.mismatches[:3]
    finally:
        model.load_state_dict(reference)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(_build(tmp_path_factory.mktemp("gpt2"), "gpt2"))


def test_conv1d_units_are_out_by_in_views(gpt2: LoadedModel) -> None:
    units = {u.name: u for u in discover_units(gpt2.model, group_columns=32)}
    u = units["transformer.h.0.attn.c_attn[g=1]"]
    conv = gpt2.model.get_submodule(u.module)
    weight = conv.weight
    assert type(conv).__name__ == "Conv1D" and u.transposed and isinstance(weight, torch.Tensor)
    assert u.shape == (3 * H, H) and u.columns == (32, 64) and u.in_features == 32
    before = weight.detach().clone()
    view = unit_weight(gpt2.model, u)
    assert torch.equal(view, before[32:64].t())
    with torch.no_grad():  # a view: a write reaches exactly the group's rows of the parameter
        view.mul_(2.0)
        assert torch.equal(weight[32:64], 2.0 * before[32:64])
        assert torch.equal(weight[:32], before[:32])
        weight.copy_(before)
    # exports size and group-check a unit from the same [out, in] shape
    shapes = model_info(str(gpt2.path)).shapes
    assert shapes[u.module] == u.shape and shapes["transformer.h.0.mlp.c_proj"] == (H, 4 * H)


def _as_linear(model: Any) -> Any:
    """The same function with every Conv1D replaced by the equivalent nn.Linear."""
    import copy

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if type(mod).__name__ != "Conv1D":
            continue
        lin = torch.nn.Linear(mod.weight.shape[0], mod.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(mod.weight.t())
            lin.bias.copy_(mod.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent), leaf, lin)
    return out


@pytest.mark.parametrize("method", ["gauss-newton", "salience"])
def test_conv1d_costs_match_the_equivalent_linear(gpt2: LoadedModel, method: str) -> None:
    # A transposition mistake anywhere (weights, gradient blocks, input Hessians) changes costs
    # of column groups; the same model built from nn.Linear is the reference.
    linear = dataclasses.replace(gpt2, model=_as_linear(gpt2.model))
    assert {type(m).__name__ for m in linear.model.modules()} & {"Conv1D", "Linear"} == {"Linear"}
    kw: dict[str, Any] = {"groups": 32, "include": "transformer.h.*"}
    a, b = _estimate(gpt2, method, **kw), _estimate(linear, method, **kw)
    assert a.units == b.units and any("c_attn[g=1]" in u for u in a.units)
    ca, cb = a.df["cost"].to_numpy(), b.df["cost"].to_numpy()
    assert ca.max() > 0
    assert ca == pytest.approx(cb, rel=1e-3, abs=1e-9 * ca.max())


def test_gpt2_gptq_apply_verifies(gpt2: LoadedModel) -> None:
    model = gpt2.model
    units = discover_units(model)
    table = _estimate(gpt2, "datafree")
    plan = solvers.solve(table, Budget(bpw=4.0)).plan
    assert plan is not None
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(_calibration(gpt2).batches)
    try:
        report = apply_plan(model, plan, method="gptq", units=units, calibration=batches)
        assert report.info["gptq_loss"]
        assert verify(model, plan, reference=reference, units=units).ok
        # one block in memory at a time: the same weights, kept as the model stores them
        seq = apply_plan_sequential(gpt2.path, plan, calibration=batches, keep_weights=True)
        state = model.state_dict()
        assert "transformer.h.0.attn.c_attn" in seq.weights
        for name, w in seq.weights.items():
            torch.testing.assert_close(w, state[f"{name}.weight"])
    finally:
        model.load_state_dict(reference)


def test_image_classifier_without_data_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = _build(tmp_path, "vit")
    config = json.loads((path / "config.json").read_text())
    del config["bitalloc_data"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidParameterError,
                       match=r"no built-in data.*bitalloc_data.*sensitivity.estimate\(loaded"):
        data_for(load_model(path), "calibration", 4)
