"""Output-distortion metrics between a reference output and a perturbed one (pure tensor maths).

Shared by the ``measured`` / ``gauss-newton`` estimators (``sensitivity``) and the backend's
evaluation (``allocator.backend``), which must not depend on each other: every function takes
plain tensors, works on any leading shape and never touches a model.

* ``kl``  — KL(P_ref ‖ P) of the softmax distributions of logits (LMs, classifiers).
* ``cos`` — 1 − cos(e_ref, e) of embeddings (encoders).
* ``mse`` — mean over the last dimension of (e − e_ref)².

All are reduced over the last (feature / vocabulary) dimension only, so that the caller decides
how to average over tokens and samples (:func:`per_sample_sums` does the usual masked sum).
They are computed in float64: a weight perturbation at 8 bits changes the output by ~1e-6,
which float32 round-off in ``log_softmax`` would swamp.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Metric",
    "cosine_distance",
    "distortion",
    "kl_divergence",
    "mean_squared_error",
    "per_sample_mean",
    "per_sample_sums",
]


class Metric(StrEnum):
    """Output-distortion metric of the ``measured`` estimator."""

    KL = "kl"  #: KL divergence of the output distributions (logits)
    COS = "cos"  #: 1 − cosine similarity (embeddings)
    MSE = "mse"  #: mean squared error (embeddings)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P) = Σ_v p_ref(v) · (log p_ref(v) − log p(v)), p = softmax over the last dim.

    Returns a tensor of shape ``ref_logits.shape[:-1]`` (one value per token / sample).
    """
    import torch

    _same_shape(ref_logits, logits)
    vocab = ref_logits.shape[-1]
    a, b = ref_logits.reshape(-1, vocab), logits.reshape(-1, vocab)
    # Positions in blocks: float64 temporaries of every position at once are 5 × 8 bytes × vocab
    # each (2.6 GB for 2048 tokens of a 32k vocabulary); each position's value is unchanged.
    rows = max(1, _KL_BLOCK_ELEMENTS // max(vocab, 1))
    out = [_kl_rows(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows)]
    flat = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=ref_logits.device)
    return flat.reshape(ref_logits.shape[:-1])


#: float64 elements per block of positions in :func:`kl_divergence` (32 MiB)
_KL_BLOCK_ELEMENTS = 1 << 22


def _kl_rows(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    import torch

    lp_ref = torch.log_softmax(ref_logits.double(), dim=-1)
    if torch.is_grad_enabled() and (ref_logits.requires_grad or logits.requires_grad):
        # differentiated (Hessian checks): out of place, autograd keeps its inputs
        return (lp_ref.exp() * (lp_ref - torch.log_softmax(logits.double(), dim=-1))).sum(dim=-1)
    # in place: two float64 blocks alive instead of five, the same values bit for bit
    # (−log p + log p_ref is log p_ref − log p exactly in IEEE arithmetic)
    diff = torch.log_softmax(logits.double(), dim=-1).neg_().add_(lp_ref)
    return diff.mul_(lp_ref.exp_()).sum(dim=-1)


def cosine_distance(ref: torch.Tensor, x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """1 − ⟨e_ref, e⟩ / (‖e_ref‖·‖e‖) over the last dim (shape ``ref.shape[:-1]``)."""
    _same_shape(ref, x)
    a, b = ref.double(), x.double()
    den = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
    return 1.0 - (a * b).sum(dim=-1) / den


def mean_squared_error(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(1/d) Σ_j (e_j − e_ref,j)² over the last dim (shape ``ref.shape[:-1]``)."""
    _same_shape(ref, x)
    return ((x.double() - ref.double()) ** 2).mean(dim=-1)


def distortion(metric: Metric | str, ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The chosen metric, reduced over the last dim only."""
    m = Metric(metric) if isinstance(metric, str) else metric
    if m is Metric.KL:
        return kl_divergence(ref, x)
    if m is Metric.COS:
        return cosine_distance(ref, x)
    return mean_squared_error(ref, x)


def per_sample_sums(
    values: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sum and count of ``values`` ([B] or [B, T, ...]) per sample (leading dim).

    ``mask`` (same leading shape as ``values``, e.g. an attention mask [B, T]) selects the
    positions that count; ``None`` counts every position.
    """
    import torch

    v = values.double()
    if mask is None:
        m = torch.ones_like(v)
    else:
        if tuple(mask.shape) != tuple(v.shape):
            raise InvalidParameterError(
                f"mask shape {tuple(mask.shape)} does not match the values {tuple(v.shape)}"
            )
        m = mask.to(v.dtype)
    if v.dim() == 1:
        return v * m, m
    dims = tuple(range(1, v.dim()))
    return (v * m).sum(dim=dims), m.sum(dim=dims)


def per_sample_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean of ``values`` per sample (0 where a sample has no counted position)."""
    s, n = per_sample_sums(values, mask)
    return s / n.clamp_min(1.0)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise InvalidParameterError(
            f"outputs have different shapes {tuple(a.shape)} and {tuple(b.shape)}; "
            "compare outputs of the same batch"
        )
