"""The task loss that gradient and Hessian estimators differentiate, per model kind.

Every loss is returned *per sample* (a vector ``ℓ`` of length B, one entry per sequence that
has something to predict); the task loss is their mean, ``L = (1/B) Σ_s ℓ_s``. Fisher needs the
per-sample terms (``F = (1/B) Σ_s g_s g_sᵀ`` with ``g_s = ∂ℓ_s/∂W`` is the empirical Fisher of
exactly this ``L``), Hutchinson and power iteration differentiate the mean.

* ``causal_lm`` — next-token cross-entropy: ``ℓ_s`` = mean over the sample's predicted tokens
  (positions t with ``mask[t] = mask[t+1] = 1``) of ``−log p(x_{t+1} | x_≤t)``. The labels are
  the inputs themselves, so no annotation is needed.
* ``classifier`` — cross-entropy against the model's own full-precision prediction
  (``argmax`` of the detached logits). Calibration text has no labels; the model's own
  decision is the target a quantized model should keep (the same choice as self-distillation).
* ``encoder`` — a self-supervised in-batch contrastive loss (InfoNCE, SimCSE-style). Each text
  is split into two *views*, the first and the second half of its tokens; each view is encoded
  on its own (the attention mask hides the other half) and mean-pooled into a unit vector. With
  ``S = Z_a Z_bᵀ / τ``, ``ℓ_s = ½ (CE(S_s·, s) + CE(S_·s, s))``. Why: a sentence encoder has no
  task head, and a loss of the frozen embeddings against themselves (e.g. MSE to the
  full-precision output) sits at its minimum, so its gradient is exactly zero. InfoNCE asks the
  same property the encoder is used for — halves of one text are closer than halves of two
  texts — and has non-zero gradients. ``τ`` = :data:`INFONCE_TEMPERATURE` (0.05, SimCSE's
  value). It needs B ≥ 2 (with one text there are no negatives and the loss is 0).
* ``generic`` — documented fallback: a model that returns ``logits`` is treated as a classifier
  (per position when the logits are [B, T, C]); otherwise, if it takes an ``attention_mask``
  and returns a hidden state, as an encoder; otherwise ``ℓ_s = ½ · mean(f(x)_s²)`` (the output
  energy: a crude but non-degenerate target).

Attention runs through the "math" scaled-dot-product kernel (:func:`differentiable_attention`)
because the fused CPU/flash kernels have no double backward, which Hessian-vector products need.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.units import get_module
from allocator.model.kind import ModelKind
from allocator.model.outputs import model_inputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "INFONCE_TEMPERATURE",
    "MODEL_KINDS",
    "differentiable_attention",
    "infonce_losses",
    "per_sample_losses",
    "task_loss",
]

MODEL_KINDS: tuple[str, ...] = tuple(k.value for k in ModelKind)
#: InfoNCE temperature τ for encoders (SimCSE, arXiv 2104.08821, uses 0.05).
INFONCE_TEMPERATURE = 0.05


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Force the ``math`` SDPA backend (twice differentiable) inside the block."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _tensor(out: Any, attr: str) -> torch.Tensor | None:
    import torch

    val = getattr(out, attr, None)
    if val is None and isinstance(out, tuple | list) and out:
        val = out[0]
    if val is None and isinstance(out, torch.Tensor):
        val = out
    return val if isinstance(val, torch.Tensor) else None


def causal_lm_losses(logits: torch.Tensor, input_ids: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """ℓ_s = mean_t −log p(x_{t+1} | x_≤t) over the sample's valid targets (rows without any
    target are dropped)."""
    import torch

    lg = logits[:, :-1].float()
    tgt = input_ids[:, 1:]
    valid = torch.ones_like(tgt, dtype=torch.bool) if mask is None else (mask[:, 1:] & mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1),
                                            reduction="none").reshape(tgt.shape)
    counts = valid.sum(1)
    keep = counts > 0
    per = (nll * valid).sum(1)[keep] / counts[keep]
    return per


def self_label_losses(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """CE against the model's own argmax prediction; [B, C] or per position of [B, T, C]."""
    import torch

    lg = logits.float()
    target = lg.detach().argmax(-1)
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1),
                                           reduction="none").reshape(target.shape)
    if ce.dim() == 1:
        return ce
    valid = torch.ones_like(ce, dtype=torch.bool) if mask is None or mask.shape != ce.shape else mask.bool()
    counts = valid.sum(1).clamp_min(1)
    return (ce * valid).sum(1) / counts


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def infonce_losses(z_a: torch.Tensor, z_b: torch.Tensor, *,
                   temperature: float = INFONCE_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE per sample: ℓ_s = ½[CE(S_s·, s) + CE(S_·s, s)], S = Z_a Z_bᵀ / τ."""
    import torch

    sim = z_a @ z_b.T / temperature
    target = torch.arange(sim.shape[0], device=sim.device)
    f = torch.nn.functional.cross_entropy
    return 0.5 * (f(sim, target, reduction="none") + f(sim.T, target, reduction="none"))


def half_view_masks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention masks of the two views: first ⌈n/2⌉ and last ⌊n/2⌋ valid tokens of each row."""
    import torch

    valid = mask.bool()
    rank = torch.cumsum(valid.long(), dim=1) - 1  # position among the row's valid tokens
    half = (valid.sum(1, keepdim=True) + 1) // 2
    first = valid & (rank < half)
    return first.to(mask.dtype), (valid & ~first).to(mask.dtype)


def _encoder_losses(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    import torch

    inputs = model_inputs(batch, kind)
    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    if mask is None:
        if not isinstance(ids, torch.Tensor):
            raise ModelError("encoder loss needs input_ids or an attention_mask in each batch")
        mask = torch.ones_like(ids)
    if mask.shape[0] < 2:
        raise InvalidParameterError(
            "the encoder's contrastive loss needs batches of ≥ 2 texts (in-batch negatives); "
            f"got a batch of {mask.shape[0]}: raise batch_size")
    pooled = []
    for view in half_view_masks(mask):
        out = model(**{**inputs, "attention_mask": view})
        hidden = _tensor(out, "last_hidden_state")
        if hidden is None or hidden.dim() != 3:
            raise ModelError("encoder model returned no [B, T, H] last_hidden_state")
        pooled.append(_pool(hidden, view))
    return infonce_losses(pooled[0], pooled[1])


def per_sample_losses(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """The vector ``ℓ`` of per-sample task losses for ``batch`` (see the module docstring)."""
    if kind not in MODEL_KINDS:
        raise InvalidParameterError(f"unknown model kind {kind!r}; use one of {MODEL_KINDS}")
    mask = batch.get("attention_mask")
    if kind == "encoder":
        return _encoder_losses(model, batch, kind)
    out = model(**model_inputs(batch, kind))
    if kind == ModelKind.CAUSAL_LM:
        logits = _tensor(out, "logits")
        ids = batch.get("input_ids")
        if logits is None or ids is None or logits.dim() != 3:
            raise ModelError("causal_lm loss needs input_ids and [B, T, V] logits")
        return causal_lm_losses(logits, ids, mask)
    logits = getattr(out, "logits", None)
    if kind == "classifier" or logits is not None:
        logits = _tensor(out, "logits")
        if logits is None:
            raise ModelError(f"model of kind {kind!r} returned no logits tensor")
        return self_label_losses(logits, mask)
    hidden = _tensor(out, "last_hidden_state")
    if mask is not None and hidden is not None and hidden.dim() == 3:
        return _encoder_losses(model, batch, "encoder")
    if hidden is None:
        raise ModelError("generic model returned no tensor to build a loss on")
    flat = hidden.float().reshape(hidden.shape[0], -1)
    return 0.5 * (flat**2).mean(1)


def task_loss(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """``L = mean_s ℓ_s`` (a scalar with a graph)."""
    losses = per_sample_losses(model, batch, kind)
    if losses.numel() == 0:
        raise InvalidParameterError("a calibration batch has no sample with a target "
                                    "(causal LM rows need ≥ 2 tokens)")
    return losses.mean()


# ---------------------------------------------------------------- unit weights as leaves
def unit_leaves(model: torch.nn.Module, units: Any) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct weight tensors behind ``units`` and, per unit, the index of its tensor.

    Column-group units of one module share a tensor; a unit's block is then a column slice
    (see :func:`unit_block`).
    """
    import torch

    leaves: list[torch.Tensor] = []
    where: dict[int, int] = {}
    index: list[int] = []
    for unit in units:
        w = get_module(model, unit.module).weight
        if not isinstance(w, torch.Tensor):
            raise ModelError(f"module {unit.module!r} has no weight tensor")
        key = id(w)
        if key not in where:
            where[key] = len(leaves)
            leaves.append(w)
        index.append(where[key])
    return leaves, index


def unit_block(t: torch.Tensor, unit: Any) -> torch.Tensor:
    """The unit's block of a tensor shaped like its module weight, as a 2-D [out, cols] view."""
    if getattr(unit, "transposed", False):  # Conv1D: the leaf (and its gradient) is [in, out]
        t = t.t()
    t2 = t.reshape(t.shape[0], -1) if t.dim() != 2 else t
    if unit.columns is None:
        return t2
    lo, hi = unit.columns
    return t2[:, lo:hi]


@contextmanager
def gradient_mode(model: torch.nn.Module, leaves: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode (no dropout: the loss is deterministic) with gradients on ``leaves`` only;
    the previous ``training`` flag and ``requires_grad`` flags are restored afterwards."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    training = model.training
    keep = {id(t) for t in leaves}
    try:
        model.eval()
        for p in params:
            p.requires_grad_(id(p) in keep)
        for t in leaves:
            t.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
        model.train(training)

