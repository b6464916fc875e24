"""Diagonal Fisher / gradient Taylor costs (GWQ arXiv 2411.00850, modelopt style).

Two targets (``FisherEstimator(target=...)``):

* ``"model"`` (default) — the *true* Fisher of the model's own output distribution, i.e. the
  diagonal of the Gauss–Newton form of the distortion plans are judged by
  (:mod:`sensitivity._curvature`): ``cost(i, b) = ½ Σ_j GN_jj ΔW_j²`` with
  ``GN_jj = E[g_j²]``, ``g = Jᵀ v`` for sampled output cotangents v (``E[v vᵀ] = H_D``). Per
  model kind: causal LM — token-mean KL(P_fp ‖ P_q), labels y ~ P_fp per token; classifier —
  per-example KL, y ~ P_fp; encoder — 1 − cos of the pooled embedding, v = (I − ê êᵀ) z/‖e‖. No
  labels; one sample per sequence is enough (encoder batches of one text are fine).
* ``"empirical"`` — the original empirical Fisher of the task loss below (next-token CE on the
  data, self-labelled CE, or the encoder's InfoNCE, whose curvature is unrelated to 1 − cos).

Empirical target:

With per-sample losses ``ℓ_s`` (:mod:`sensitivity._loss`) and ``g_s = ∂ℓ_s/∂W``, the empirical
Fisher of the mean loss is ``F = (1/N) Σ_s g_s g_sᵀ``; its diagonal ``F_jj = (1/N) Σ_s g_sj²``
approximates the Gauss–Newton diagonal, and the second-order Taylor model of the loss increase
of a weight perturbation ΔW (gradient term dropped: the model sits near a minimum of its own
loss) is

    cost(i, b) = ½ Σ_{j ∈ unit i} F_jj ΔW_j²,   ΔW = Q_b(W) − W  (shared RTN quantizer).

It is computed as the mean of per-sample terms ``c_s(i, b) = ½ Σ_j g_sj² ΔW_j²`` so that
``cost_std`` is their standard error (std over samples / √N).

Per-sample gradients: one forward per batch, then one backward per row of ``ℓ`` on the retained
graph (``per_sample="loop"``) or a single vmapped backward over identity cotangents
(``"vmap"``, ``torch.func.vmap`` over ``autograd.grad``). Both differentiate the batch forward (no torch.func
re-trace), which is what the encoder's in-batch contrastive loss needs: its ``ℓ_s`` depends on
the other texts of the batch (the negatives). ``"auto"`` picks vmap for small models and GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from sensitivity._base import EstimateContext, Partial, SampleMeanEstimator, UnitCosts, mean_and_sem
from sensitivity._curvature.passes import curvature_in_passes
from sensitivity._curvature.sampling import check_probes
from sensitivity._curvature.split import SplitTerm, already_finished
from sensitivity._curvature.terms import gn_diagonal_terms
from sensitivity._deltas import DEFAULT_DELTA_BUDGET_MB, check_delta_budget, delta_groups, quant_deltas
from sensitivity._loss import (
    differentiable_attention,
    gradient_mode,
    per_sample_losses,
    unit_block,
    unit_leaves,
)
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

__all__ = ["FISHER_TARGETS", "FisherEstimator", "fisher_sample_costs"]

PER_SAMPLE_MODES = ("auto", "loop", "vmap")
#: "model": sampled-output true Fisher / GN diagonal (default); "empirical": task-loss gradients.
FISHER_TARGETS = ("model", "empirical")
#: Below this many unit weights, "auto" uses the vmapped backward (per-call overhead dominates).
_VMAP_BELOW = 2_000_000


def fisher_sample_costs(model: torch.nn.Module, ctx: EstimateContext, *, per_sample: str = "auto",
                        chunk: int = 8) -> np.ndarray:
    """``c_s(i, b) = ½ Σ_j g_sj² ΔW_j²`` for every sample s: (samples, units, options)."""

    if per_sample not in PER_SAMPLE_MODES:
        raise InvalidParameterError(f"per_sample must be one of {PER_SAMPLE_MODES}, got {per_sample!r}")
    leaves, index = unit_leaves(model, ctx.units)
    n_weights = sum(t.numel() for t in leaves)
    batched = per_sample == "vmap" or (per_sample == "auto" and (
        not ctx.device.startswith("cpu") or n_weights < _VMAP_BELOW))
    d2 = quant_deltas(model, ctx, squared=True)
    rows: list[np.ndarray] = []
    with gradient_mode(model, leaves), progress_bar(len(ctx.batches), "fisher batches",
                                                     ctx.progress) as bar:
        for batch in ctx.batches:
            with differentiable_attention():
                losses = per_sample_losses(model, batch, ctx.model_kind)
            for lo in range(0, losses.numel(), chunk):
                hi = min(lo + chunk, losses.numel())
                for grads in _sample_grads(losses, leaves, lo, hi, batched):
                    rows.append(_costs_of(grads, ctx.units, index, d2))
            bar.update(1)
    if not rows:
        raise InvalidParameterError("no calibration sample has a target; use longer texts")
    return np.stack(rows)


def _sample_grads(losses: torch.Tensor, leaves: Sequence[torch.Tensor], lo: int, hi: int,
                  batched: bool) -> list[list[torch.Tensor]]:
    """Gradients of ``ℓ_lo … ℓ_{hi−1}`` (unused leaves: zeros), on the retained batch graph."""
    import torch

    if batched:
        eye = torch.zeros(hi - lo, losses.numel(), dtype=losses.dtype, device=losses.device)
        eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
        def grad_of(cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
            res = torch.autograd.grad(losses, list(leaves), grad_outputs=cot, retain_graph=True,
                                      allow_unused=True)
            return tuple(torch.zeros_like(t) if r is None else r
                         for r, t in zip(res, leaves, strict=True))

        stacked = torch.func.vmap(grad_of)(eye)
        return [[r[s] for r in stacked] for s in range(hi - lo)]
    out = []
    for s in range(lo, hi):
        res = torch.autograd.grad(losses[s], list(leaves), retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(t) if r is None else r for r, t in zip(res, leaves, strict=True)])
    return out


def _costs_of(grads: Sequence[torch.Tensor], units: Sequence[object], index: Sequence[int],
              d2: Sequence[torch.Tensor]) -> np.ndarray:
    out = np.empty((len(units), d2[0].shape[0]))
    for i, (unit, k) in enumerate(zip(units, index, strict=True)):
        out[i] = gn_diagonal_terms(unit_block(grads[k].detach(), unit), d2[i]).cpu().numpy()
    return out


class FisherEstimator(SampleMeanEstimator):
    """Diagonal Fisher: cost(i, b) = ½ Σ_j F_jj (Q_b(W) − W)_j² (see module doc).

    Both targets are means over calibration samples, so the estimator shards by batch: the
    ``model`` target through :class:`~sensitivity._base.SampleMeanEstimator`, the ``empirical``
    one with the sums ``S₁ = Σ_s c_s``, ``S₂ = Σ_s c_s²`` and N (cost = S₁/N, cost_std =
    √((S₂ − S₁²/N)/(N − 1))/√N, the standard error of the sample mean).

    Args:
        target: ``model`` (true Fisher / GN diagonal of the output distortion, default) or
            ``empirical`` (gradients of the task loss).
        probes: output cotangents per sample (``model`` target).
        per_sample: ``auto``, ``loop`` (one backward per sample) or ``vmap`` (one vmapped
            backward per ``chunk`` samples).
        chunk: ``empirical``: samples per vmapped backward (memory: chunk × unit weights),
            default 8; ``model``: rows per forward, default 1 (every (row, probe) backward
            runs through the whole forward's rows, so more rows only pay on a GPU).
        delta_budget_mb: MiB of deltas held per pass (``model`` target).
        by_blocks: ``model`` target: factor each backward over the transformer blocks where the
            model allows it (the same table; not for a head tied to the embedding, whose squared
            gradient cannot be formed path by path), as ``gauss-newton`` does.
    """

    name: ClassVar[str] = "fisher"

    def __init__(self, *, target: str = "model", probes: int = 2, per_sample: str = "auto",
                 chunk: int | None = None,
                 delta_budget_mb: float = DEFAULT_DELTA_BUDGET_MB, by_blocks: bool = True) -> None:
        if not isinstance(by_blocks, bool):
            raise InvalidParameterError(f"by_blocks must be true or false, got {by_blocks!r}")
        if target not in FISHER_TARGETS:
            raise InvalidParameterError(f"target must be one of {FISHER_TARGETS}, got {target!r}")
        if per_sample not in PER_SAMPLE_MODES:
            raise InvalidParameterError(f"per_sample must be one of {PER_SAMPLE_MODES}, got {per_sample!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise InvalidParameterError(f"chunk must be an int ≥ 1, got {chunk!r}")
        check_delta_budget(delta_budget_mb)
        self.target = target
        self.probes = check_probes(probes)
        self.per_sample = per_sample
        self.chunk = chunk
        self.delta_budget_mb = delta_budget_mb
        self.by_blocks = by_blocks

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        if self.target == "model":
            return self._model_costs(model, ctx)
        return self._finish(model, ctx, self._partial(model, ctx))

    def _partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        if self.target == "model":
            return super()._partial(model, ctx)
        groups = delta_groups(ctx.units, ctx.options, check_delta_budget(self.delta_budget_mb))
        c = np.concatenate([fisher_sample_costs(
            model, dataclasses.replace(ctx, units=[ctx.units[i] for i in g]),
            per_sample=self.per_sample, chunk=self.chunk or 8) for g in groups], axis=1)
        return Partial(sums={"cost:s1": c.sum(axis=0), "cost:s2": (c**2).sum(axis=0)},
                       counts={"samples": int(c.shape[0])})

    def _finish(self, model: torch.nn.Module, ctx: EstimateContext, partial: Partial) -> UnitCosts:
        if self.target == "model":
            return super()._finish(model, ctx, partial)
        n = int(partial.counts["samples"])
        # positions = samples: the per-sample mean itself (no per-position rescaling)
        cost, std = mean_and_sem(partial.sums["cost:s1"], partial.sums["cost:s2"], n, n)
        return UnitCosts(cost=cost, cost_std=std, info={"samples": n})

    def _model_costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        return curvature_in_passes(model, ctx, gn_diagonal_terms, squared=True,
                                   budget_bytes=check_delta_budget(self.delta_budget_mb),
                                   probes=self.probes, chunk=self.chunk or 1,
                                   per_sample=self.per_sample, label="fisher",
                                   split=FISHER_SPLIT, by_blocks=self.by_blocks)


#: ``½ Σ g² ΔW²`` sums over a unit's rows, but not over two paths of one gradient (squared)
FISHER_SPLIT = SplitTerm(linear=gn_diagonal_terms, finish=already_finished)
