"""The output a model's quality is measured on, from one batch (model side, pure forward).

One home for "run the model on a batch and take the tensor that matters", shared by the
estimators (``sensitivity``) and the backend's evaluation (``allocator.backend``), so that neither
depends on the other:

* ``causal_lm`` / ``classifier`` (and ``generic`` models that return logits) — the logits;
* ``encoder`` — the attention-mask mean-pooled last hidden state, L2-normalised (the sentence
  embedding as sentence-transformers computes it).

torch is imported inside the functions (``import allocator`` stays light).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from allocator.core.errors import ModelError
from allocator.model.kind import ModelKind

if TYPE_CHECKING:
    import torch

__all__ = ["NON_INPUT_KEYS", "OUTPUT_CHUNK_BYTES", "forward_outputs", "mean_pool_normalize",
           "model_inputs", "output_width", "probe_batch", "rows_within", "tokens_within"]

#: Batch keys that are targets or bookkeeping, never model inputs.
NON_INPUT_KEYS: frozenset[str] = frozenset({"labels", "label", "idx", "text"})

#: float32 bytes of per-token outputs one forward may produce in the chunked consumers (block cache,
#: refinement, evaluation): a causal LM's logits are the vocabulary per token, 4096 tokens of a 128k
#: vocabulary are 2.1 GB. Each consumer holds a few tensors of this size at once (the outputs, the
#: reference read back, the metric's temporaries), so it bounds the peak above the model; 341
#: tokens of a 49k vocabulary still make forwards large enough to be efficient on a CPU.
OUTPUT_CHUNK_BYTES = 64 * 2**20


def output_width(model: Any, kind: str) -> int | None:
    """Floats per token of a causal LM's output (its vocabulary); None for outputs per sample."""
    if kind != ModelKind.CAUSAL_LM:
        return None
    head = getattr(model, "get_output_embeddings", lambda: None)()
    width = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(width) if isinstance(width, int) and width > 0 else None


def tokens_within(model: Any, kind: str, max_tokens: int, budget: int = OUTPUT_CHUNK_BYTES) -> int:
    """``max_tokens``, lowered so that one forward's per-token outputs fit ``budget`` bytes."""
    width = output_width(model, kind)
    if width is None:
        return max_tokens
    return max(1, min(max_tokens, budget // (4 * width)))


def rows_within(model: Any, kind: str, seq_len: int, batch_size: int,
                budget: int = OUTPUT_CHUNK_BYTES) -> int:
    """``batch_size``, lowered so that a batch of ``seq_len``-token rows has its per-token
    outputs within ``budget`` bytes (at least one row)."""
    tokens = tokens_within(model, kind, batch_size * seq_len, budget)
    return max(1, min(batch_size, tokens // max(seq_len, 1)))


#: tokens kept per sample by :func:`probe_batch`
PROBE_TOKENS = 32


def probe_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """One sample of ``batch``, its token tensors (2-D integer tensors of one length) cut to the
    first :data:`PROBE_TOKENS`: for questions about a model's structure (which modules a forward
    calls, what reaches the output), which one short sample answers as well as a batch, without
    the memory of a real LLM's batch (its graph, its vocabulary-wide logits)."""
    import torch

    out = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    tokens = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 2
              and not v.is_floating_point()]
    if tokens and len({int(out[k].shape[1]) for k in tokens}) == 1:
        out.update({k: out[k][:, :PROBE_TOKENS] for k in tokens})
    return out


def model_inputs(batch: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The keyword arguments of ``model(**...)`` for ``batch``: targets dropped, and no KV cache
    for causal LMs (a cache would only cost memory here)."""
    inputs = {k: v for k, v in dict(batch).items() if k not in NON_INPUT_KEYS}
    if kind == ModelKind.CAUSAL_LM:
        inputs.setdefault("use_cache", False)
    return inputs


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it:
    e = normalize(Σ_t m_t h_t / max(Σ_t m_t, 1e-9)); a 2-D ``hidden`` is only normalised."""
    import torch

    if hidden.dim() == 2:
        return torch.nn.functional.normalize(hidden, dim=-1)
    m = (torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device) if mask is None
         else mask.to(hidden.dtype))
    pooled = (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def forward_outputs(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """The output a distortion or an evaluation metric is measured on (see the module doc).

    Gradients are not disabled: wrap the call in ``torch.inference_mode()`` when not needed.
    """
    import torch

    out = model(**model_inputs(batch, kind))
    logits = getattr(out, "logits", None)
    kind_ = str(kind)
    if kind_ in (ModelKind.CAUSAL_LM, ModelKind.CLASSIFIER) or (
            kind_ == ModelKind.GENERIC and logits is not None):
        if logits is None:
            logits = out[0] if isinstance(out, tuple | list) else out
        if not isinstance(logits, torch.Tensor):
            raise ModelError(f"model of kind {kind!r} returned no logits tensor")
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(hidden, torch.Tensor):
        raise ModelError("encoder model returned no last_hidden_state tensor")
    am = batch.get("attention_mask")
    return mean_pool_normalize(hidden, am if isinstance(am, torch.Tensor) else None)
