"""Curvature under a memory budget: units whose deltas fit together share a pass over the data;
a unit whose deltas alone exceed the budget is measured in output-row pieces, one pass each, and
its term rebuilt exactly from the pieces' linear parts (:class:`~sensitivity._curvature.split.SplitTerm`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.units import unit_weight
from sensitivity._base import EstimateContext, UnitCosts
from sensitivity._curvature.output_metric import output_metric
from sensitivity._curvature.reductions import UnitReduction, unit_reduction
from sensitivity._curvature.sampling import (
    SampledCurvature,
    curvature_from_sums,
    pair_curvature,
    pair_stream,
    sampled_curvature,
)
from sensitivity._curvature.split import SplitTerm, row_pieces
from sensitivity._deltas import delta_bytes, delta_groups, quant_deltas, weight_deltas
from sensitivity._loss import unit_leaves

if TYPE_CHECKING:
    import torch

__all__ = ["curvature_in_passes"]


def curvature_in_passes(model: torch.nn.Module, ctx: EstimateContext,
                        term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, squared: bool,
                        budget_bytes: int, probes: int, chunk: int, per_sample: str,
                        label: str, split: SplitTerm | None = None, by_blocks: bool = False) -> UnitCosts:
    """:func:`sampled_curvature` of ``term(g_u, deltas_u)`` (``ΔW²`` with ``squared``) over
    groups of units whose deltas fit ``budget_bytes``
    (:func:`~sensitivity._deltas.delta_groups`), one pass over the data per group.

    With ``split``, a unit whose deltas alone exceed the budget (a 32000-row LM head at 1B, the
    MLP matrices of larger models) is measured in :func:`row_pieces`, one pass each: the passes
    draw the same cotangents, so summing the pieces' linear parts per (sample, probe) before
    ``finish`` gives that unit's ``term`` exactly. Without it such a unit gets a pass of its own
    holding all its deltas.

    With ``by_blocks``, where the model allows it, one backward per (row, probe) is factored over
    the transformer blocks instead (:func:`sensitivity._sequential_curvature.curvature_by_blocks`:
    the same table, every block run forward twice and backward once whatever the number of
    groups); otherwise, and for the reason recorded as ``by_blocks`` in the info, the passes."""
    import dataclasses

    why_not = None
    if by_blocks:
        from sensitivity._sequential_curvature import NotFactorable, curvature_by_blocks

        try:
            return curvature_by_blocks(model, ctx, term=term, squared=squared, budget_bytes=budget_bytes,
                                       probes=probes, split=split, label=label)
        except NotFactorable as e:
            why_not = str(e)

    big = {i for i, u in enumerate(ctx.units)
           if split is not None and delta_bytes(u, ctx.options) > budget_bytes}
    small = [i for i in range(len(ctx.units)) if i not in big]
    groups = [[small[j] for j in g]
              for g in delta_groups([ctx.units[i] for i in small], ctx.options, budget_bytes)]
    pieces = {i: row_pieces(ctx.units[i], ctx.options, budget_bytes) for i in sorted(big)}
    n_passes = len(groups) + sum(map(len, pieces.values()))
    shape = (len(ctx.units), len(ctx.options))
    mean, sem = np.empty(shape), np.empty(shape)
    est: SampledCurvature | None = None
    for n, group in enumerate(groups):
        sub = dataclasses.replace(ctx, units=[ctx.units[i] for i in group])
        deltas = quant_deltas(model, sub, squared=squared)
        _, index = unit_leaves(model, sub.units)
        reduce = unit_reduction(sub.units, index, _bound(term, deltas))
        tag = label if n_passes == 1 else f"{label} pass {n + 1}/{n_passes}"
        est = sampled_curvature(model, sub, reduce, probes=probes, chunk=chunk,
                                per_sample=per_sample, label=tag)
        mean[group], sem[group] = est.mean, est.sem
        del deltas, reduce
    done = len(groups)
    for i, rows in pieces.items():
        if split is None:  # unreachable: nothing is split without it
            break
        est = _split_unit(model, dataclasses.replace(ctx, units=[ctx.units[i]]), rows, split,
                          squared=squared, probes=probes, chunk=chunk, per_sample=per_sample,
                          label=f"{label} pass {done + 1}-{done + len(rows)}/{n_passes}")
        mean[i], sem[i] = est.mean[0], est.sem[0]
        done += len(rows)
    info = est.info() if est is not None else {}
    return UnitCosts(cost=mean, cost_std=sem, info={**info, "passes": n_passes,
                                                    **({"by_blocks": why_not} if why_not else {})})


def _split_unit(model: torch.nn.Module, ctx: EstimateContext, rows: Sequence[tuple[int, int]],
                split: SplitTerm, *, squared: bool, probes: int, chunk: int, per_sample: str,
                label: str) -> SampledCurvature:
    """One unit (``ctx.units[0]``) in row pieces: per (sample, probe) Σ_pieces linear, then finish."""
    import torch

    unit = ctx.units[0]
    _, index = unit_leaves(model, [unit])
    total: torch.Tensor | None = None
    counts: list[int] = []
    for lo, hi in rows:
        delta = weight_deltas(unit, unit_weight(model, unit), ctx.options, ctx.quantizer,
                              squared=squared, rows=(lo, hi))
        reduce = _piece_reduction(unit, index[0], lo, hi, split.linear, delta)
        stream = list(pair_stream(model, ctx, reduce, probes=probes, chunk=chunk,
                                  per_sample=per_sample, label=label))
        part = torch.stack([t for _, t in stream])  # [samples, probes, 1, options]
        counts = [c for c, _ in stream]
        total = part if total is None else total + part
        del delta, reduce
    if total is None or not counts:
        return curvature_from_sums(None, None, 0, 0, probes, output_metric(ctx.model_kind))
    return pair_curvature(split.finish(total), counts, output_metric(ctx.model_kind))


def _piece_reduction(unit: Any, leaf: int, lo: int, hi: int,
                     linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     delta: torch.Tensor) -> UnitReduction:
    return UnitReduction([unit], [leaf], lambda g, _: linear(g[lo:hi], delta))


def _bound(term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           deltas: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda g, i: term(g, deltas[i])
