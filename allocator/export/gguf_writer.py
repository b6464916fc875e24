"""A plan applied to a Llama-family model, written as a llama.cpp GGUF file
(``bitalloc export PLAN --to llamacpp --model M --gguf out.gguf``).

What llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``) followed by ``llama-quantize`` would
write, with the plan's type for each planned tensor:

* tensors: gguf-py's llama name map (``blk.N.attn_q.weight`` …); q/k rows permuted as the
  converter's ``LlamaModel.permute`` does (per head, the two rotary halves interleaved:
  reshape ``[heads, 2, rows/heads/2, cols]``, swap axes 1 and 2), k with the kv-head count; a
  tied ``lm_head`` is not written (llama.cpp reads ``token_embd`` for the output).
* types: a planned tensor in its ggml type, bytes from :func:`~allocator.export.gguf_quant.ggml_quantize`
  (quantized after the permutation: ggml quantizes each row on its own, so the rows' values
  are the unpermuted ones). 1-D tensors and norms F32; other 2-D tensors in ``outtype`` (the
  converter's ``--outtype``: f16 by default, bf16, f32 or q8_0).
* metadata: ``general.*`` (architecture, type, name, file_type, quantization_version) and
  ``llama.*`` (context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count(_kv), attention.layer_norm_rms_epsilon, rope.freq_base,
  rope.dimension_count, vocab_size), plus the tokenizer (:mod:`allocator.export.gguf_vocab`).

A planned type whose block does not divide the row cannot be stored: refused, or with
``lossy`` replaced by llama.cpp's own fallback (``llama-quantize``'s ``tensor_type_fallback``)
and reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import DependencyUnavailableError, ExportError
from allocator.core.formats import GGUF_TYPES

if TYPE_CHECKING:
    import torch

    from allocator.core.plan import BitPlan
    from allocator.export._exporter import ExportContext
    from allocator.export._settings import Setting

__all__ = ["OUTTYPES", "GgufFile", "permute_rotary", "write_gguf"]

#: the converter's --outtype choices for tensors outside the plan
OUTTYPES = ("f16", "bf16", "f32", "q8_0")


@dataclass(frozen=True, kw_only=True)
class GgufFile:
    """What was written: GGUF tensor name → ggml type (``q4_K``, ``f16``, ``f32``), notes, changes."""

    path: Path
    types: Mapping[str, str]
    notes: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's ``LlamaModel.permute``: HF's rotate-half row order → llama.cpp's
    interleaved pairs. ``W'[h, j, i] = W[h, i, j]`` over the view ``[n_head, 2, d/2, cols]``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise DependencyUnavailableError("writing GGUF needs gguf-py: pip install gguf") from None
    return gguf


def _planned_types(ctx: ExportContext, settings: Mapping[str, Setting], tensors: Mapping[str, list[str]],
                   ncols: Mapping[str, int]) -> dict[str, str]:
    """GGUF tensor → the plan's ggml type, with llama.cpp's row fallback in lossy mode."""
    from allocator.export.llamacpp_presets import row_fallback

    out: dict[str, str] = {}
    for t, modules in tensors.items():
        s = settings[modules[0]]
        planned = s.gguf or s.float_dtype.replace("fp16", "f16")
        n = ncols[t]
        if planned in GGUF_TYPES and n % GGUF_TYPES[planned].block:
            msg = (f"{t} has rows of {n} weights, not a multiple of {planned}'s block of "
                   f"{GGUF_TYPES[planned].block}")
            if not ctx.lossy:
                raise ctx.fail(msg + "; choose a type with a smaller block",
                               lossy_hint="store llama.cpp's fallback type")
            fb = row_fallback(planned, n)
            ctx.notes.append(f"lossy: {msg}: stored as {fb} (llama.cpp's fallback)")
            for m in modules:
                ctx.changed[m] = (planned, fb)
            planned = fb
        out[t] = planned
    return out


def _file_type(gguf: Any, plan: BitPlan, types: Mapping[str, str], params: Mapping[str, int]) -> int:
    """``general.file_type``: a preset plan's own ftype, else the ftype of the quantized type holding
    the most weights (llama.cpp only displays it)."""
    preset = plan.solver.params.get("preset") if plan.solver.name == "llamacpp-preset" else None
    if preset is not None and hasattr(gguf.LlamaFileType, f"MOSTLY_{preset}"):
        return int(getattr(gguf.LlamaFileType, f"MOSTLY_{preset}"))
    by_type: dict[str, int] = {}
    for t, ty in types.items():
        by_type[ty] = by_type.get(ty, 0) + params[t]
    quantized = {k: v for k, v in by_type.items() if k not in ("f16", "bf16", "f32")}
    top = max(quantized, key=lambda k: quantized[k]) if quantized else "f16"
    names = {"q3_K": "MOSTLY_Q3_K_M", "q4_K": "MOSTLY_Q4_K_M", "q5_K": "MOSTLY_Q5_K_M", "f16": "MOSTLY_F16",
             "bf16": "MOSTLY_BF16"}
    member = getattr(gguf.LlamaFileType, names.get(top, "MOSTLY_" + top.upper()), None)
    return int(member if member is not None else gguf.LlamaFileType.GUESSED)


def _add_hparams(w: Any, config: Any, name: str, file_type: int) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ExportError(f"llamacpp: rope scaling {rope.get('rope_type')!r} is not written here; "
                          "convert this model with llama.cpp's convert_hf_to_gguf.py")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    w.add_type("model")
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_file_type(file_type)
    w.add_vocab_size(int(config.vocab_size))
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _tensor_data(gguf: Any, w: torch.Tensor, ggml_type: str,
                 importance: torch.Tensor | None) -> tuple[Any, Any]:
    """(array, raw_dtype) for ``GGUFWriter.add_tensor``; raw_dtype None lets gguf-py infer F32/F16."""
    import torch

    from allocator.export.gguf_quant import ggml_quantize

    if ggml_type == "f32":
        return w.to(torch.float32).contiguous().numpy(), None
    if ggml_type == "f16":
        return w.to(torch.float16).contiguous().numpy(), None
    if ggml_type == "bf16":
        bf16 = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(w.to(torch.float32).contiguous().numpy(), bf16), bf16
    q = ggml_quantize(w.to(torch.float32), ggml_type, importance=importance)
    return q.data, getattr(gguf.GGMLQuantizationType, ggml_type.upper())


def _hf_to_gguf(gguf: Any, names: list[str], n_blocks: int, tied: bool) -> dict[str, str]:
    """HF state-dict key → GGUF tensor name (a tied lm_head and rotary buffers are not written)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    out: dict[str, str] = {}
    for hf in names:
        if (tied and hf == "lm_head.weight") or hf.endswith("rotary_emb.inv_freq"):
            continue
        new = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"llamacpp: tensor {hf!r} has no name in llama.cpp's llama tensor map")
        out[hf] = new
    return out


def write_gguf(plan: BitPlan, model: str | Path, path: str | Path, *, lossy: bool = False,
               outtype: str = "f16", importance: Mapping[str, torch.Tensor] | None = None) -> GgufFile:
    """Write ``model`` with ``plan`` applied as a llama.cpp GGUF file at ``path`` (atomically).

    Args:
        model: a Llama-family model spec (``tiny-llama``, a local HF dir) with its tokenizer.
        lossy: store llama.cpp's fallback type where a planned block does not divide a row, and
            raise modules sharing one GGUF tensor to the highest setting (each change reported).
        outtype: the type of 2-D tensors outside the plan (:data:`OUTTYPES`).
        importance: unit → per-input-column importance for the quantizer (llama.cpp's imatrix).

    Raises:
        ExportError: a non-llama model, a plan the file cannot hold, or a type this build cannot
            quantize; DependencyUnavailableError: gguf-py is missing.
    """
    from allocator.core.atomic import atomic_path
    from allocator.export._exporter import ExportContext
    from allocator.export.gguf_vocab import add_vocab
    from allocator.export.llamacpp import tensor_settings
    from allocator.model.loading import load_model

    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ExportError(f"llamacpp: outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    loaded = load_model(model, kind="causal_lm")
    config: Any = loaded.model.config
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(f"llamacpp: --gguf writes Llama-family models; {loaded.name!r} is "
                          f"{getattr(config, 'model_type', None)!r}")
    state = loaded.model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in state.items()
              if k.endswith(".weight") and v.ndim == 2}
    ctx = ExportContext(plan=plan, target="llamacpp", lossy=lossy, model_names=frozenset(shapes),
                        shapes=shapes, arch="llama")
    settings, tensors, _ = tensor_settings(ctx, tied=tied)
    planned = _planned_types(ctx, settings, tensors, {t: shapes[ms[0]][1] for t, ms in tensors.items()})
    n_layer, n_head = int(config.num_hidden_layers), int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    gguf_names = _hf_to_gguf(gguf, list(state), n_layer, tied)
    types: dict[str, str] = {}
    for hf, new in gguf_names.items():
        w = state[hf].detach()
        base = new.removesuffix(".weight")
        types[new] = ("f32" if w.ndim <= 1 or new.endswith("_norm.weight")
                      else planned.get(base, outtype) if new.endswith(".weight") else "f32")
    params = {n: int(state[hf].numel()) for hf, n in gguf_names.items()}
    out = Path(path)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        _add_hparams(writer, config, loaded.name, _file_type(gguf, plan, types, params))
        if any(t not in ("f16", "bf16", "f32") for t in types.values()):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, Path(loaded.path), int(config.vocab_size))
        for hf, new in gguf_names.items():
            w = state[hf].detach()
            if hf.endswith("self_attn.q_proj.weight"):
                w = permute_rotary(w, n_head)
            elif hf.endswith("self_attn.k_proj.weight"):
                w = permute_rotary(w, n_kv)
            unit = next(iter(tensors.get(new.removesuffix(".weight"), [])), None)
            imp = (importance or {}).get(unit) if unit is not None else None
            data, raw = _tensor_data(gguf, w, types[new], imp)
            writer.add_tensor(new, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    notes = [f"wrote {len(types)} tensors ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}); "
             f"{len(planned)} from the plan, other 2-D tensors {outtype}, 1-D and norms f32"
             + ("; lm_head tied to token_embd" if tied else ""), *ctx.notes]
    return GgufFile(path=out, types=types, notes=tuple(notes), changed=dict(ctx.changed))
