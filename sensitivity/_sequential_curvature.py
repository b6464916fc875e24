"""``gauss-newton`` and ``fisher`` block by block: the sampled curvature without the whole model.

The whole-model estimators (:mod:`sensitivity._curvature`) take, per calibration row s and
output probe k, one backward ``g_{s,k} = Jᵀ v_{s,k}`` and reduce each unit's block of it. A
backward factors over the blocks: the cotangent at block i's output, ``δ_{i+1}``, gives block i's
weight gradients and the cotangent at its input, ``δ_i = (∂ block_i / ∂ x)ᵀ δ_{i+1}``. So on a
:class:`~allocator.model.sequential.SequentialModel`:

1. a forward sweep loads each block once and keeps its inputs (hidden states of every batch);
2. the head stage computes the output the evaluator compares (logits through the final norm and
   head, or the mean-pooled normalised embedding), draws the cotangents exactly as the
   whole-model path does (same per-batch generator, same row order), scores planned head units,
   and keeps ``δ_L`` per (row, probe);
3. a reverse sweep loads block L−1 … 0, re-runs it on its cached inputs with gradients, and per
   (row, probe) takes ``(δ_i, unit gradients) = vjp(δ_{i+1})``, scores the block's units, then
   releases the block.

Parameters in memory: the non-block ones plus one block; on top, every block's cached inputs
(calibration rows × tokens × hidden × blocks) and ``δ`` of one boundary (× probes). Deltas are
held per block under ``delta_budget_mb`` (groups of the block's units, one re-run each). The
table equals the whole-model one up to float round-off (tests). A head tied to the input
embedding is refused: its gradient also flows through the embedding lookup, which is not a
block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.model.kind import ModelKind
from allocator.model.outputs import mean_pool_normalize
from sensitivity._base import EstimateContext, UnitCosts
from sensitivity._curvature.output_metric import output_metric, row_cotangents
from sensitivity._curvature.sampling import pair_curvature
from sensitivity._deltas import delta_groups, quant_deltas
from sensitivity._loss import differentiable_attention, unit_block, unit_leaves

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.sequential import BlockInputs, SequentialModel

__all__ = ["curvature_sequential"]

Term = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
#: (batch index, stage input with grad) → stage output
Stage = Callable[[int, "torch.Tensor"], "torch.Tensor"]


def curvature_sequential(seq: SequentialModel, ctx: EstimateContext, by_block: Mapping[int, Sequence[Unit]],
                         tail: Sequence[Unit], *, term: Term, squared: bool, budget_bytes: int,
                         probes: int) -> UnitCosts:
    """``(1/T) Σ_s mean_k term(g_{s,k,u}, ΔW_u)`` for every unit of ``ctx.units`` (in blocks
    ``by_block`` or the head ``tail``), one block in memory (module doc)."""
    import torch

    kind = str(ctx.model_kind)
    if kind not in (ModelKind.CAUSAL_LM, ModelKind.ENCODER):
        raise InvalidParameterError(f"sequential gauss-newton / fisher support causal LMs and encoders, "
                                    f"not model kind {kind!r}; run the estimator on the whole model")
    if tail and _tied_head(seq):
        raise InvalidParameterError("the output head is tied to the input embedding, whose gradient "
                                    "sequential mode cannot see; exclude the head or run the whole model")
    where = {u.name: i for i, u in enumerate(ctx.units)}
    terms: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ctx.units))}
    cached = [list(step.inputs) for step in seq.steps(ctx.batches)]  # loads each block once
    final = [inp.hidden for inp in seq.final_inputs]
    metric = output_metric(kind)
    pairs: list[list[tuple[int, int]]] = []
    cots: list[list[torch.Tensor]] = []  # per batch, per (row, probe): the row's cotangent
    counts: list[int] = []
    for b, (batch, h) in enumerate(zip(ctx.batches, final, strict=True)):
        with torch.no_grad():
            out = _outputs(seq, h, batch, kind)
        drawn, row_counts = row_cotangents(out, batch, kind, metric, probes, ctx.batch_generator(b))
        rows = [r for r in range(out.shape[0]) if row_counts[r] > 0]
        pairs.append([(r, k) for r in rows for k in range(probes)])
        cots.append([drawn[r][k] for r, k in pairs[-1]])
        counts.extend(row_counts[r] for r in rows)

    def head(b: int, h: torch.Tensor) -> torch.Tensor:
        return _outputs(seq, h, ctx.batches[b], kind)

    stage = _Stage(ctx=ctx, model=seq.model, pairs=pairs, term=term, squared=squared,
                   budget_bytes=budget_bytes, terms=terms, where=where)
    with torch.enable_grad():
        cots = stage.backward(head, final, cots, tail)
        for i in reversed(range(len(seq.blocks))):
            block = seq.load_block(i)
            try:
                cots = stage.backward(block_stage(block, cached[i]), [x.hidden for x in cached[i]],
                                      cots, by_block.get(i, ()))
            finally:
                seq.release_block(i)
    return _costs(terms, counts, probes, metric, len(ctx.options))


def block_stage(block: torch.nn.Module, inputs: Sequence[BlockInputs]) -> Stage:
    """Block ``block`` as a stage: batch b's cached positional / keyword arguments, input ``x``."""
    def run(b: int, x: torch.Tensor) -> torch.Tensor:
        inp = inputs[b]
        out = block(x, *inp.args, **inp.kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Stage:
    """Backwards through one stage (a block, or the final norm and head)."""

    ctx: EstimateContext
    model: torch.nn.Module
    pairs: Sequence[Sequence[tuple[int, int]]]
    term: Term
    squared: bool
    budget_bytes: int
    terms: dict[int, list[torch.Tensor]]
    where: Mapping[str, int]

    def backward(self, run: Stage, xs: Sequence[torch.Tensor], cots: Sequence[Sequence[torch.Tensor]],
                 units: Sequence[Unit]) -> list[list[torch.Tensor]]:
        """Per batch and (row, probe): the vjp of the row's cotangent at the stage output gives
        the row's cotangent at the stage input (returned) and the gradients of ``units`` (scored
        into ``terms``). Units go in groups whose deltas fit the budget, one re-run each."""
        groups = delta_groups(units, self.ctx.options, self.budget_bytes) if units else [[]]
        back: list[list[torch.Tensor]] = [[] for _ in xs]
        for n, group in enumerate(groups):
            self._group(run, xs, cots, [units[j] for j in group], back if n == 0 else None)
        return back

    def _group(self, run: Stage, xs: Sequence[torch.Tensor], cots: Sequence[Sequence[torch.Tensor]],
               units: Sequence[Unit], back: list[list[torch.Tensor]] | None) -> None:
        import torch

        sub = dataclasses.replace(self.ctx, units=list(units))
        deltas = quant_deltas(self.model, sub, squared=self.squared) if units else []
        leaves, index = unit_leaves(self.model, units) if units else ([], [])
        flags = [t.requires_grad for t in leaves]
        for t in leaves:
            t.requires_grad_(True)
        try:
            for b, x_b in enumerate(xs):
                if not self.pairs[b]:
                    continue
                x = x_b.detach().requires_grad_(True)
                with differentiable_attention():
                    y = run(b, x)
                for (r, _), cot in zip(self.pairs[b], cots[b], strict=True):
                    full = torch.zeros_like(y)
                    full[r] = cot.to(y.dtype)
                    grads = torch.autograd.grad(y, [x, *leaves], grad_outputs=full, retain_graph=True,
                                                allow_unused=True)
                    if back is not None:
                        back[b].append(torch.zeros_like(x[r]) if grads[0] is None else grads[0][r].detach())
                    for u, k, d in zip(units, index, deltas, strict=True):
                        g = grads[1 + k]
                        g = torch.zeros_like(leaves[k]) if g is None else g.detach()
                        self.terms[self.where[u.name]].append(self.term(unit_block(g, u), d))
        finally:
            for t, f in zip(leaves, flags, strict=True):
                t.requires_grad_(f)


def _outputs(seq: SequentialModel, h: torch.Tensor, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """What the evaluator compares, from the last block's output ``h``."""
    norm = seq.final_norm()
    if kind == ModelKind.CAUSAL_LM:
        head = seq.head()
        if head is None:
            raise InvalidParameterError("the model has no output head to compute logits from")
        return head(norm(h) if norm is not None else h)
    mask = batch.get("attention_mask")
    return mean_pool_normalize(norm(h) if norm is not None else h, mask)


def _tied_head(seq: SequentialModel) -> bool:
    head = seq.head()
    get_in = getattr(seq.model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return head is not None and emb is not None and head.weight is emb.weight


def _costs(terms: Mapping[int, list[torch.Tensor]], counts: Sequence[int], probes: int, metric: str,
           width: int) -> UnitCosts:
    """Per-unit sample means and standard errors (:func:`pair_curvature`)."""
    import torch

    n_units = len(terms)
    mean, sem = np.empty((n_units, width)), np.empty((n_units, width))
    info: dict[str, Any] = {}
    for i in range(n_units):
        est = pair_curvature(torch.stack(terms[i]).reshape(len(counts), probes, width), counts, metric)
        mean[i], sem[i] = est.mean, est.sem
        info = est.info()
    return UnitCosts(cost=mean, cost_std=sem, info={**info, "sequential": True})
