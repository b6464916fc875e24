"""llama.cpp's ``llama-quantize`` presets (Q2_K, Q3_K_S/M/L, Q4_K_S/M) as bit plans.

A preset (an *ftype*) is not one ggml type: ``llama_tensor_get_type_impl`` in
``src/llama-quant.cpp`` gives each tensor a type from its role (``attn_v``, ``ffn_down``,
``attn_output``, ``output``, ``token_embd``), its layer and the model's shape, then
``tensor_type_fallback`` replaces a type whose block does not divide the row. The rules below were
read from ggml-org/llama.cpp at commit ``007dbbf3`` (dense llama-family models; MoE, Falcon and the
IQ presets are not covered):

* default type: Q2_K → q2_K; Q3_K_* → q3_K; Q4_K_* → q4_K.
* ``output`` — and ``token_embd`` when the model has no ``output`` tensor (tied embeddings) —
  q8_0 when the row is not a multiple of the default type's block, else q6_K.
* ``attn_v`` (``i`` = its index among attn_v tensors, ``n`` = their count, n_gqa = heads / kv heads):
  Q2_K q4_K if n_gqa ≥ 4 else q3_K; Q3_K_M q5_K for i < 2 else q4_K; Q3_K_L q5_K;
  Q4_K_M q6_K where use_more_bits(i, n); Q4_K_S q5_K for i < 4; a 70B llama (80 layers, GQA)
  then raises q3_K/q4_K to q5_K.
* ``ffn_down`` (``i`` = layer): Q2_K q3_K; Q3_K_M q5_K for i < n/16 else q4_K; Q3_K_L q5_K;
  Q4_K_M q6_K where use_more_bits(i, n); Q4_K_S q5_K for i < n/8.
* ``attn_output``: Q2_K q3_K; Q3_K_M q4_K; Q3_K_L q5_K.
* fallback when the row (``ne[0]``, the input features) is not a multiple of the block:
  q2_K, q3_K → q4_0; q4_K → q5_0; q5_K → q5_1; q6_K → q8_0; f16 when even that block does not
  divide it. (Releases before mid-2025 sent q2_K/q3_K to iq4_nl instead.)

Sizes are exact: each tensor's ggml block bytes (``allocator.core.formats.GGUF_TYPES``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError, UnknownNameError
from allocator.core.formats import GGUF_TYPES

if TYPE_CHECKING:
    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable

__all__ = ["LLAMACPP_COMMIT", "PRESETS", "PresetShape", "llamacpp_preset_plan", "preset_tensor_types",
           "row_fallback", "use_more_bits"]

#: the llama.cpp source the rules were read from
LLAMACPP_COMMIT = "007dbbf3fd17eefe9b47fee45f48f7ba5e62b714"
#: preset (llama-quantize ftype) → its default ggml type
PRESETS: dict[str, str] = {"Q2_K": "q2_K", "Q3_K_S": "q3_K", "Q3_K_M": "q3_K", "Q3_K_L": "q3_K",
                           "Q4_K_S": "q4_K", "Q4_K_M": "q4_K"}
_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True, kw_only=True)
class PresetShape:
    """What the rules read from a model besides tensor names: head counts and layer count."""

    n_layer: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for the llama arch: 80 layers with grouped-query attention."""
        return self.n_layer == 80 and self.n_head != self.n_head_kv


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pick: i < n/8 or i ≥ 7n/8 or (i − n/8) mod 3 = 2 (integer division)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def row_fallback(ggml_type: str, ncols: int) -> str:
    """``tensor_type_fallback``: the type llama.cpp stores when ``ncols`` is not a multiple of the block."""
    if ggml_type not in GGUF_TYPES or ncols % GGUF_TYPES[ggml_type].block == 0:
        return ggml_type
    if ggml_type.startswith("iq") and GGUF_TYPES[ggml_type].block == 256:
        fb = "iq4_nl"
    elif ggml_type in _FALLBACK:
        fb = _FALLBACK[ggml_type]
    else:
        raise InvalidParameterError(f"llama.cpp defines no fallback for {ggml_type!r} on rows of {ncols}")
    return fb if ncols % GGUF_TYPES[fb].block == 0 else "f16"


def _attn_v(preset: str, i: int, n: int, shape: PresetShape, t: str) -> str:
    if preset == "Q2_K":
        t = "q4_K" if shape.n_gqa >= 4 else "q3_K"
    elif preset == "Q3_K_M":
        t = "q5_K" if i < 2 else "q4_K"
    elif preset == "Q3_K_L":
        t = "q5_K"
    elif preset == "Q4_K_M" and use_more_bits(i, n):
        t = "q6_K"
    elif preset == "Q4_K_S" and i < 4:
        t = "q5_K"
    if shape.is_70b and t in ("q3_K", "q4_K"):
        t = "q5_K"
    return t


def _ffn_down(preset: str, i: int, n: int, t: str) -> str:
    if preset == "Q2_K":
        return "q3_K"
    if preset == "Q3_K_M":
        return "q5_K" if i < n // 16 else "q4_K"
    if preset == "Q3_K_L":
        return "q5_K"
    if preset == "Q4_K_M":
        return "q6_K" if use_more_bits(i, n) else t
    if preset == "Q4_K_S" and i < n // 8:
        return "q5_K"
    return t


_ATTN_OUTPUT = {"Q2_K": "q3_K", "Q3_K_M": "q4_K", "Q3_K_L": "q5_K"}


def preset_tensor_types(tensors: Mapping[str, int], preset: str, shape: PresetShape) -> dict[str, str]:
    """GGUF tensor (``blk.3.attn_v``, ``output``, ``token_embd``; no ``.weight``) → ggml type.

    ``tensors`` maps every quantizable 2-D tensor of the file to its row length (``ne[0]``, the
    input features); the model is tied when it has no ``output`` tensor.

    Raises:
        UnknownNameError: ``preset`` is not one of :data:`PRESETS`.
    """
    if preset not in PRESETS:
        raise UnknownNameError(f"unknown llama.cpp preset {preset!r}; choose one of {', '.join(PRESETS)}")
    default = PRESETS[preset]
    tied = "output" not in tensors
    n_v = sum(1 for t in tensors if t.endswith(".attn_v"))
    # llama.cpp visits tensors ordered by layer (weight_name_comparer): attn_v's i = its rank
    v_rank = {t: i for i, t in enumerate(sorted((t for t in tensors if t.endswith(".attn_v")),
                                                key=lambda t: int(t.split(".")[1])))}
    out: dict[str, str] = {}
    for name, ncols in tensors.items():
        t = default
        m = _BLOCK.match(name)
        role = m[2] if m else name
        if role == "output" or (tied and role == "token_embd"):
            t = "q8_0" if ncols % GGUF_TYPES[default].block else "q6_K"
        elif role == "attn_v":
            t = _attn_v(preset, v_rank[name], n_v, shape, t)
        elif role == "ffn_down" and m:
            t = _ffn_down(preset, int(m[1]), shape.n_layer, t)
        elif role == "attn_output":
            t = _ATTN_OUTPUT.get(preset, t)
        out[name] = row_fallback(t, ncols)
    return out


def _tensor_of(unit: str, tied: bool) -> str | None:
    from allocator.export.llamacpp import gguf_tensor_name

    t = gguf_tensor_name(unit, "llama", 0)
    return "token_embd" if tied and t == "output" else t


def _model_shapes(spec: str | Path) -> tuple[dict[str, tuple[int, ...]], PresetShape, bool, list[str]]:
    """Shapes, head counts, tying and the default units (the linear modules) of a model spec."""
    import transformers

    from allocator.export._model import model_info, resolve_model_path

    config = transformers.AutoConfig.from_pretrained(resolve_model_path(str(spec)))
    info = model_info(str(spec))
    if getattr(config, "model_type", None) != "llama":
        raise InvalidParameterError(f"llama.cpp presets are modelled for llama-family models; "
                                    f"{str(spec)!r} is {config.model_type!r}")
    n_head = int(config.num_attention_heads)
    shape = PresetShape(n_layer=int(config.num_hidden_layers), n_head=n_head,
                        n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head))
    units = sorted(n for n in info.names if n != "model.embed_tokens")
    return dict(info.shapes), shape, bool(getattr(config, "tie_word_embeddings", False)), units


def _shape_from_units(shapes: Mapping[str, tuple[int, ...]], n_head: int | None,
                      n_head_kv: int | None) -> PresetShape:
    """Layer count from the names; n_gqa from q_proj/k_proj rows when the head counts are not given."""
    layers = {int(m[1]) for u in shapes if (m := re.search(r"\.layers\.(\d+)\.", u))}
    if n_head is None or n_head_kv is None:
        q = next((s[0] for u, s in shapes.items() if u.endswith("self_attn.q_proj")), None)
        k = next((s[0] for u, s in shapes.items() if u.endswith("self_attn.k_proj")), None)
        if q is None or k is None:
            raise InvalidParameterError("the units hold no q_proj/k_proj pair to read n_gqa from; pass "
                                        "n_head and n_head_kv")
        n_head, n_head_kv = q // k, 1  # only the ratio (n_gqa) is used below 80 layers
    return PresetShape(n_layer=1 + max(layers, default=-1), n_head=n_head, n_head_kv=n_head_kv)


def llamacpp_preset_plan(
    model_or_units: str | Path | Mapping[str, tuple[int, ...]], preset: str, *,
    units: Iterable[str] | None = None, tied: bool | None = None,
    n_head: int | None = None, n_head_kv: int | None = None,
) -> BitPlan:
    """The plan ``llama-quantize … PRESET`` makes: one ggml type per unit, exact GGUF sizes.

    Args:
        model_or_units: a model spec (local HF dir, ``tiny-llama``; shapes, head counts and
            tying are read from it) or HF module name → weight shape (out, in) of every weight
            module of the model (the rules count attn_v tensors and layers over the whole model).
        units: the plan's units (default: every linear module; add ``model.embed_tokens`` to
            include the token embedding). Must be modules with a GGUF tensor.
        tied: the model ties ``lm_head`` to the embedding (mapping input; default: no ``lm_head``).
        n_head / n_head_kv: head counts (mapping input; default: the q_proj/k_proj row ratio).

    Raises:
        UnknownNameError: unknown preset.
        InvalidParameterError: a unit with no GGUF tensor, or a non-llama model.
    """
    from allocator.core.plan import BitPlan, SolverInfo

    if preset not in PRESETS:
        raise UnknownNameError(f"unknown llama.cpp preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(model_or_units, Mapping):
        shapes = {str(u): tuple(int(d) for d in s) for u, s in model_or_units.items()}
        shape = _shape_from_units(shapes, n_head, n_head_kv)
        is_tied = tied if tied is not None else not any(u.endswith("lm_head") for u in shapes)
        default_units = sorted(u for u in shapes if not u.endswith("embed_tokens"))
        model = None
    else:
        shapes, shape, is_tied, default_units = _model_shapes(model_or_units)
        model = str(model_or_units)
    tensor_of = {u: t for u in shapes if (t := _tensor_of(u, is_tied)) is not None}
    ncols = {t: _ncols(shapes[u]) for u, t in tensor_of.items()}
    types = preset_tensor_types(ncols, preset, shape)
    chosen = list(units) if units is not None else [u for u in default_units if u in tensor_of]
    bad = [u for u in chosen if u not in tensor_of]
    if bad:
        raise InvalidParameterError(f"unit {bad[0]!r} has no GGUF tensor in the llama name map "
                                    "(or no shape); pass modules of the model")
    table = _one_option_table({u: (types[tensor_of[u]], _params(shapes[u])) for u in chosen},
                              {"model": model, "consumer": "llamacpp", "llamacpp_preset": preset})
    return BitPlan.from_choice(table, {u: types[tensor_of[u]] for u in chosen}, solver=SolverInfo(
        name="llamacpp-preset", status="feasible",
        params={"preset": preset, "llama.cpp": LLAMACPP_COMMIT[:12], "tied": is_tied,
                "n_gqa": shape.n_gqa}))


def _ncols(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _params(shape: tuple[int, ...]) -> int:
    return shape[0] * _ncols(shape)


def _one_option_table(rows: Mapping[str, tuple[str, int]], meta: Mapping[str, object]) -> CostTable:
    """A cost table holding only the chosen option of each unit (cost 0: a preset predicts nothing)."""
    import pandas as pd

    from allocator.core.formats import parse_format
    from allocator.core.table import CostTable

    df = pd.DataFrame([{"unit": u, "params": p, "option": o, "bits": float(parse_format(o).bits),
                        "size_bits": parse_format(o).bits_per_weight() * p, "cost": 0.0}
                       for u, (o, p) in rows.items()])
    return CostTable(df, dict(meta))
