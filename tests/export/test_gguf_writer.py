"""``export --to llamacpp --gguf``: the written file loads in transformers, holds the plan's types,
and its weights are exactly the quantizer's values (q/k unpermuted), for tiny-llama and a tied
GQA Llama; the tokenizer round-trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from allocator.cli import main  # noqa: E402
from allocator.core.errors import ExportError  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.export.gguf_quant import _has_ggml_module, ggml_quantize  # noqa: E402
from allocator.export.gguf_vocab import pre_tokenizer_name  # noqa: E402
from allocator.export.gguf_writer import permute_rotary, write_gguf  # noqa: E402

from .conftest import TINY_LLAMA, make_plan  # noqa: E402

SENTENCE = "The quick brown fox returns a list of 42 items.\n  Done!"
#: legacy types gguf-py quantizes; K-quants join when llama.cpp's quantizers are in the build
OPTIONS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "fp16"]
#: written independently of the writer: HF module → GGUF tensor for the llama family
_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def gguf_name(unit: str, tied: bool) -> str:
    if unit == "lm_head":
        return "token_embd.weight" if tied else "output.weight"
    if unit == "model.embed_tokens":
        return "token_embd.weight"
    layer, rest = unit.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{_GGUF[rest]}.weight"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' inverse of the converter's permutation (an independent implementation)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _plan(model: torch.nn.Module, pick_of: dict[str, str]) -> object:
    units = discover_units(model, fusion=None)
    return make_plan(units, sorted(set(pick_of.values())), lambda u, rng: pick_of[u.name])


def _mixed(model: torch.nn.Module) -> dict[str, str]:
    names = [u.name for u in discover_units(model, fusion=None)]
    pick = {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}
    if _has_ggml_module():  # the only rows of 512 (a multiple of 256) are down_proj's
        pick.update({n: k for n, k in zip([n for n in names if n.endswith("down_proj")],
                                          ["q4_K", "q6_K", "q2_K", "q3_K"], strict=False)})
    return pick


def _check_file(path: Path, model_dir: Path, model: torch.nn.Module, pick: dict[str, str],
                tied: bool) -> None:
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    field = reader.fields
    assert field["general.architecture"].contents() == "llama"
    assert field["llama.block_count"].contents() == cfg.num_hidden_layers
    assert field["llama.attention.head_count_kv"].contents() == n_kv
    assert field["tokenizer.ggml.model"].contents() == "gpt2"
    assert ("output.weight" in tensors) is not tied
    state = {k: v.float() for k, v in model.state_dict().items()}
    for unit, opt in pick.items():
        t = tensors[gguf_name(unit, tied)]
        want_type = "F16" if opt == "fp16" else opt.upper()
        assert t.tensor_type.name == want_type, unit
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(state[unit + ".weight"].shape)
        if unit.endswith("q_proj"):
            got = unpermute(got, n_head)
        elif unit.endswith("k_proj"):
            got = unpermute(got, n_kv)
        w = state[unit + ".weight"]
        want = w.half().float() if opt == "fp16" else ggml_quantize(w, opt).values
        assert np.array_equal(got, want.numpy()), unit
    for t in reader.tensors:
        if t.name.endswith("norm.weight"):
            assert t.tensor_type.name == "F32", t.name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32)
    got_state = loaded.state_dict()
    for name, w in state.items():
        unit = name.removesuffix(".weight")
        if tied and unit in ("lm_head", "model.embed_tokens"):  # one token_embd tensor
            unit = "lm_head" if "lm_head" in pick else "model.embed_tokens"
        if w.ndim < 2:
            want = w
        elif unit in pick and pick[unit] != "fp16":
            want = ggml_quantize(w, pick[unit]).values
        else:
            want = w.half().float()
        assert torch.equal(got_state[name], want), name
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok(SENTENCE).input_ids == ref(SENTENCE).input_ids


def test_tiny_llama_mixed_plan(tmp_path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    pick = _mixed(model)
    result = write_gguf(_plan(model, pick), "tiny-llama", tmp_path / "tiny.gguf")
    assert {gguf_name(u, False) for u in pick} <= set(result.types)
    _check_file(tmp_path / "tiny.gguf", TINY_LLAMA, model, pick, tied=False)


def test_tied_gqa_llama(tmp_path) -> None:
    """Tied lm_head → one token_embd in the plan's type; k permuted with the kv-head count."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                   tie_word_embeddings=True, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    d = tmp_path / "tied"
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / f, d / f)
    names = [u.name for u in discover_units(model, fusion=None)]
    pick = {n: ["q8_0", "q4_1", "q5_0"][i % 3] for i, n in enumerate(names)}
    write_gguf(_plan(model, pick), d, tmp_path / "out" / "tied.gguf")
    _check_file(tmp_path / "out" / "tied.gguf", d, model, pick, tied=True)


def test_rows_not_a_multiple_of_the_block(tmp_path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    pick = dict.fromkeys((u.name for u in discover_units(model, fusion=None)), "q8_0")
    pick["model.layers.0.self_attn.o_proj"] = "q4_K"  # rows of 128 < 256
    plan = _plan(model, pick)
    with pytest.raises(ExportError, match=r"attn_output has rows of 128.*--lossy"):
        write_gguf(plan, "tiny-llama", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    result = write_gguf(plan, "tiny-llama", tmp_path / "x.gguf", lossy=True)
    assert result.types["blk.0.attn_output.weight"] == "q5_0"  # llama.cpp's fallback for q4_K
    assert result.changed["model.layers.0.self_attn.o_proj"] == ("q4_K", "q5_0")


def test_permutation_is_the_converters() -> None:
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    p = permute_rotary(w, 2)  # head_dim 4: rows (0, 2, 1, 3) of each head
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert np.array_equal(unpermute(p.numpy(), 2), w.numpy())


def test_pre_tokenizer_names() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    with pytest.raises(ExportError, match="Metaspace"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_cli_gguf_and_errors(tmp_path, capsys) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    plan_path = tmp_path / "plan.json"
    _plan(model, dict.fromkeys((u.name for u in discover_units(model, fusion=None)), "q8_0")).save(plan_path)
    out = tmp_path / "m.gguf"
    assert main(["export", str(plan_path), "--to", "llamacpp", "--model", "tiny-llama",
                 "--gguf", str(out), "--base", "q8_0"]) == 0
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(plan_path), "--to", "hqq", "--model", "tiny-llama", "--gguf", str(out)]) == 2
    assert "--to llamacpp" in capsys.readouterr().err


@pytest.mark.skipif(not _has_ggml_module(), reason="K-quants need llama.cpp's quantizers "
                    "(allocator.model.quant.ggml), not in this build")
def test_preset_plan_as_gguf(tmp_path) -> None:
    from allocator.export import llamacpp_preset_plan

    plan = llamacpp_preset_plan("tiny-llama", "Q4_K_M")
    write_gguf(plan, "tiny-llama", tmp_path / "q4km.gguf")
    reader = gguf.GGUFReader(tmp_path / "q4km.gguf")
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert {gguf_name(u, False): o.lower() for u, o in plan.choice.items()}.items() <= types.items()
    assert types["token_embd.weight"] == "f16"  # not a plan unit: the converter's outtype
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
