"""load_model: bundled MiniLM and tiny-llama offline, kinds, fingerprints, forward outputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError, ModelError  # noqa: E402
from allocator.model.data import CalibrationData  # noqa: E402
from allocator.model.loading import (  # noqa: E402
    LoadedModel,
    ModelKind,
    default_model_path,
    detect_kind,
    load_model,
    model_fingerprint,
    model_forward_outputs,
    tiny_lm_path,
)


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load_model("minilm")


def test_minilm_is_the_bundled_encoder(minilm: LoadedModel) -> None:
    assert minilm.kind is ModelKind.ENCODER and minilm.name == "minilm"
    assert Path(minilm.path) == default_model_path()
    assert not minilm.model.training
    assert next(minilm.model.parameters()).dtype == torch.float32
    assert len(minilm.fingerprint) == 64
    assert minilm.fingerprint == model_fingerprint(minilm.model)


def test_encoder_outputs_are_normalised_sentence_embeddings(minilm: LoadedModel) -> None:
    data = CalibrationData.from_corpus(minilm.tokenizer, n_samples=4, seq_len=24, batch_size=4)
    batch = data[0]
    with torch.inference_mode():
        emb = model_forward_outputs(minilm, batch)
        hidden = minilm.model(**batch).last_hidden_state
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    # sentence-transformers: mean over real tokens only, then L2-normalise
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(emb, ref)
    # padding does not change a text's embedding
    with torch.inference_mode():
        one = model_forward_outputs(minilm, {k: v[-1:, : int(batch["attention_mask"][-1].sum())]
                                             for k, v in batch.items()})
    torch.testing.assert_close(one[0], emb[-1], atol=1e-5, rtol=1e-4)


def test_tiny_llama_is_a_llama_causal_lm(tiny: LoadedModel) -> None:
    assert tiny.kind is ModelKind.CAUSAL_LM and tiny.name == "tiny-llama"
    assert Path(tiny.path) == tiny_lm_path()
    names = {n for n, m in tiny.model.named_modules() if isinstance(m, torch.nn.Linear)}
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.0.{suffix}" in names
    assert "lm_head" in names
    for name, mod in tiny.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 128 == 0, name
    size = sum(f.stat().st_size for f in tiny_lm_path().iterdir())
    assert size < 7_000_000


def test_tiny_llama_predicts_text_better_than_unigram(tiny: LoadedModel) -> None:
    """The shipped LM has learned something: held-out NLL well below the model card's unigram."""
    card = json.loads((tiny_lm_path() / "training.json").read_text())
    data = CalibrationData.from_corpus(tiny.tokenizer, split="evaluation", n_samples=16,  # its card's
                                       seq_len=64, batch_size=16, pack=True, domain="docs")  # domain
    with torch.inference_mode():
        logits = model_forward_outputs(tiny, data[0])
    ids = data[0]["input_ids"]
    assert logits.shape == (*ids.shape, len(tiny.tokenizer))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert float(nll.exp()) < 0.5 * card["perplexity"]["unigram_evaluation"]


def test_tokenizer_round_trip(tiny: LoadedModel) -> None:
    text = "Return a new list containing all items from the iterable."
    ids = tiny.tokenizer(text)["input_ids"]
    assert ids[0] == tiny.tokenizer.bos_token_id
    assert tiny.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tiny.tokenizer.pad_token_id is not None


def test_fingerprint_is_stable_and_sees_one_weight(tiny: LoadedModel) -> None:
    again = load_model(tiny_lm_path())
    assert again.fingerprint == tiny.fingerprint and again.kind is ModelKind.CAUSAL_LM
    w = again.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[0, 0] += 1e-3
    assert model_fingerprint(again.model) != tiny.fingerprint


def test_dtype_and_kind_override(tiny: LoadedModel) -> None:
    bf = load_model("tiny-llama", dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    assert bf.fingerprint != tiny.fingerprint
    with pytest.raises(InvalidParameterError, match="dtype"):
        load_model("tiny-llama", dtype="int3")
    with pytest.raises(InvalidParameterError, match="unknown model kind"):
        load_model("tiny-llama", kind="decoder")


def test_detect_kind() -> None:
    assert detect_kind({"architectures": ["LlamaForCausalLM"]}) is ModelKind.CAUSAL_LM
    assert detect_kind({"architectures": ["GPT2LMHeadModel"]}) is ModelKind.CAUSAL_LM
    assert detect_kind({"architectures": ["BertForSequenceClassification"]}) is ModelKind.CLASSIFIER
    assert detect_kind({"architectures": ["BertModel"]}) is ModelKind.ENCODER
    assert detect_kind({"architectures": ["T5ForConditionalGeneration"]}) is ModelKind.GENERIC
    assert detect_kind({}) is ModelKind.ENCODER


def test_local_classifier_directory(tmp_path: Path, minilm: LoadedModel) -> None:
    cfg = transformers.BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    clf = load_model(str(tmp_path))
    assert clf.kind is ModelKind.CLASSIFIER and clf.name == tmp_path.name
    data = CalibrationData.from_texts(["one text", "another text"], clf.tokenizer, n_samples=2)
    with torch.inference_mode():
        assert model_forward_outputs(clf, data[0]).shape == (2, 3)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model path '/no/such/model' does not exist; pass a local"):
        load_model("/no/such/model")
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))
    f = tmp_path / "file.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelError, match="is not a directory"):
        load_model(str(f))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path))
