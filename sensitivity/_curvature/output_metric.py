"""The output metric's Hessian ``H_D`` per model kind, and the sampled output cotangents ``v``
with ``E[v vᵀ] = H_D`` that turn one backward into a Gauss–Newton sample (package doc):
softmax Fisher for KL (causal LMs, classifiers, generic), the projector ``(I − ê êᵀ)/‖e‖²`` for
the encoders' ``1 − cos``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from allocator.model.kind import ModelKind

if TYPE_CHECKING:
    import torch

__all__ = ["cosine_cotangent", "cosine_output_hessian", "kl_cotangent", "kl_cotangent_at", "kl_label",
           "output_metric", "row_cotangents", "softmax_cdf", "softmax_fisher"]


def softmax_fisher(p: torch.Tensor) -> torch.Tensor:
    """``H_KL = diag(p) − p pᵀ``: Hessian in the logits l of ``KL(p ‖ softmax(l))`` at
    ``softmax(l) = p`` (over the last dim; returns [..., C, C])."""
    import torch

    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def cosine_output_hessian(e: torch.Tensor) -> torch.Tensor:
    """``H_cos = (I − ê êᵀ)/‖e‖²``: Hessian in x of ``1 − cos(e, x)`` at x = e.

    With e = r ê, a = ê·δ/r and b = ‖δ‖²/r², cos(e, e + δ) = (1 + a)/√(1 + 2a + b)
    = 1 − b/2 + a²/2 + O(δ³), so 1 − cos = ½ (‖δ‖² − (ê·δ)²)/r² = ½ δᵀ H_cos δ.
    """
    import torch

    r2 = (e * e).sum(-1, keepdim=True).unsqueeze(-1)
    e_hat = torch.nn.functional.normalize(e, dim=-1)
    eye = torch.eye(e.shape[-1], dtype=e.dtype, device=e.device)
    return (eye - e_hat.unsqueeze(-1) * e_hat.unsqueeze(-2)) / r2


def kl_cotangent(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``v = ∇_l(−log p_y) = p − onehot(y)`` with ``y = F_p⁻¹(u)`` (u ~ U(0, 1) per position, so
    y ~ p): ``E[v vᵀ] = diag(p) − p pᵀ`` (:func:`softmax_fisher`). Shape of ``logits``."""
    p, cdf = softmax_cdf(logits)
    return kl_cotangent_at(p, kl_label(cdf, u))


def softmax_cdf(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, cumsum p)`` in float64 over the last dim: computed once per output row and shared
    by its probes (:func:`row_cotangents`)."""
    import torch

    p = torch.softmax(logits.detach().double(), dim=-1)
    return p, torch.cumsum(p, dim=-1)


def kl_label(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``y = F_p⁻¹(u)`` per position from :func:`softmax_cdf`'s ``cdf`` (shape [..., 1])."""
    import torch

    y = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1).contiguous())
    return y.clamp_max(cdf.shape[-1] - 1)


def kl_cotangent_at(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p − onehot(y)``: ``p`` copied once and the label's entry lowered by 1 in place (the same
    float operation as subtracting the one-hot, without a second vocabulary-wide tensor)."""
    import torch

    return p.clone().scatter_add_(-1, y, torch.full(y.shape, -1.0, dtype=p.dtype, device=p.device))


def cosine_cotangent(e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``v = (I − ê êᵀ) z / ‖e‖`` with z ~ N(0, I): ``E[v vᵀ] = (I − ê êᵀ)/‖e‖²``
    (:func:`cosine_output_hessian`; the projector is idempotent)."""

    e = e.detach().double()
    r = e.norm(dim=-1, keepdim=True)
    e_hat = e / r.clamp_min(1e-30)
    z = z.double()
    return (z - e_hat * (e_hat * z).sum(-1, keepdim=True)) / r.clamp_min(1e-30)


def output_metric(kind: str) -> str:
    """The evaluator's metric per model kind: ``cos`` for encoders, ``kl`` for the rest."""
    return "cos" if kind == "encoder" else "kl"


def row_cotangents(out: torch.Tensor, batch: Mapping[str, Any], kind: str, metric: str, probes: int,
                gen: torch.Generator) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Per row: ``probes`` output cotangents (shaped like ``out[row]``) and its counted positions.

    KL counts the attention-mask positions for causal LMs (as the evaluator) and every position
    otherwise; cos counts one per row."""
    import torch

    mask = None
    if metric == "kl" and kind == ModelKind.CAUSAL_LM and out.dim() == 3:
        am = batch.get("attention_mask")
        if isinstance(am, torch.Tensor) and tuple(am.shape) == tuple(out.shape[:2]):
            mask = am.to(out.device).bool()
    cots: list[list[torch.Tensor]] = []
    counts: list[int] = []
    for row in range(out.shape[0]):
        o = out[row].detach()
        if metric == "kl":
            per_row = _kl_row(o, mask[row] if mask is not None else None, probes, gen, out.dtype)
        else:
            per_row = []
            for _ in range(probes):
                z = torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64)
                per_row.append(cosine_cotangent(o, z.to(o.device)).to(out.dtype))
        cots.append(per_row)
        if metric == "cos":
            counts.append(1)
        elif mask is not None:
            counts.append(int(mask[row].sum()))
        else:
            counts.append(int(math.prod(o.shape[:-1])))
    return cots, counts


def _kl_row(o: torch.Tensor, mask: torch.Tensor | None, probes: int, gen: torch.Generator,
            dtype: torch.dtype) -> list[torch.Tensor]:
    """One row's ``probes`` KL cotangents in ``dtype``: the values of
    ``(softmax(o) − onehot(y)) · mask`` computed in float64 and then rounded, with a
    vocabulary-wide float64 tensor alive only while the labels are drawn (p and its cdf, once per
    row, not per probe). Off the label every entry is ``p`` itself, so it is ``p`` rounded; the
    label's entry is ``p_y − 1`` rounded; the 0/1 mask commutes with the rounding."""
    import torch

    p, cdf = softmax_cdf(o)
    labels = [kl_label(cdf, torch.rand(tuple(o.shape[:-1]), generator=gen,
                                       dtype=torch.float64).to(o.device)) for _ in range(probes)]
    del cdf
    lowered = [(p.gather(-1, y) - 1.0).to(dtype) for y in labels]
    rounded = p.to(dtype)
    del p
    out = []
    for y, v_y in zip(labels, lowered, strict=True):
        v = rounded.clone().scatter_(-1, y, v_y)
        if mask is not None:
            v.mul_(mask.unsqueeze(-1))
        out.append(v)
    return out
