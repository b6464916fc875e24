"""Layer-local estimators block by block: ``hessian-proxy`` and ``salience`` without the whole model.

Both estimators need, per Linear module ``m``, only its weight and the statistics of its own
inputs (:mod:`sensitivity._salience`):

    H_m = (2 / N_tok) Σ_t x_t x_tᵀ   (hessian-proxy keeps diag H_m only),

and the cost of unit ``i`` in module ``m`` under option ``b`` is a function of ``H_m`` and
``ΔW_i(b)`` alone. So they can run on :class:`allocator.model.sequential.SequentialModel`: each
block is loaded, its modules' input sums are accumulated from the block's cached inputs (padding
tokens skipped, as the whole-model hooks do), the estimator's own ``_finish`` scores that block's
units while its weights are in memory, and the block is released. The output head is scored last
from the final norm of the last block's outputs. Here the cached inputs are those of the *float*
model (nothing is quantized), so the table equals the whole-model table.

Peak parameter memory: non-block parameters + one block. ``gauss-newton`` and ``fisher`` (the
default, output-consistent target) run too, by a reverse sweep over the blocks that carries the
output cotangents backwards (:mod:`sensitivity._sequential_curvature`). ``hessian-trace``,
``relevance`` and ``measured`` have no sequential mode and are refused here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat, parse_format
from allocator.core.units import weight_view
from sensitivity._base import BaseEstimator, EstimateContext, Partial, UnitCosts
from sensitivity._curvature.split import SplitTerm
from sensitivity._deltas import check_delta_budget
from sensitivity._salience import HessianProxyEstimator, InputHessian, SalienceEstimator, check_tokens
from sensitivity._sequential_curvature import NotFactorable, curvature_sequential, split_by_block

if TYPE_CHECKING:
    import torch

    from allocator.core.table import CostTable
    from allocator.core.units import Unit
    from allocator.model.sequential import BlockInputs, SequentialModel

__all__ = ["LAYER_LOCAL", "SEQUENTIAL", "estimate_sequential"]

#: estimators whose costs depend on a module's own inputs and weights only
LAYER_LOCAL = ("hessian-proxy", "salience")
#: every estimator with a block-by-block mode (the sampled-curvature ones by a reverse sweep)
SEQUENTIAL = (*LAYER_LOCAL, "gauss-newton", "fisher")


def estimate_sequential(
    path: str | os.PathLike[str] | SequentialModel,
    estimator: str | BaseEstimator,
    *,
    batches: Sequence[Mapping[str, Any]],
    options: Sequence[QuantFormat | str],
    units: Sequence[Unit] | None = None,
    seed: int = 0,
    dtype: Any = "float32",
    device: str = "cpu",
    metadata: Mapping[str, Any] | None = None,
) -> CostTable:
    """The cost table of ``estimator`` for the model in ``path``, one block in memory.

    Args:
        path: the model directory (safetensors), or a ready :class:`SequentialModel`.
        estimator: ``hessian-proxy``, ``salience``, ``gauss-newton`` or ``fisher`` (a name or an
            instance; its parameters apply).
        batches: calibration batches (``input_ids``, ``attention_mask``).
        options: candidate formats (names or :class:`QuantFormat`).
        units: the units to score (default: every Linear of the model, ``discover_units``).

    Raises:
        InvalidParameterError: an estimator without a sequential mode, no batches, or a unit
            neither in a block nor the output head.
    """
    from allocator.core.units import discover_units
    from allocator.model.sequential import SequentialModel
    from sensitivity._registry import get_estimator

    est = get_estimator(estimator)
    curvature = _curvature_terms(est)
    if curvature is None and not isinstance(est, HessianProxyEstimator | SalienceEstimator):
        raise InvalidParameterError(f"estimator {est.name!r} has no sequential mode; it runs "
                                    f"{', '.join(SEQUENTIAL)} (others need the whole model)")
    seq = path if isinstance(path, SequentialModel) else SequentialModel(path, dtype=dtype, device=device)
    chosen = list(units) if units is not None else discover_units(seq.model)
    ctx = EstimateContext(batches=batches, units=chosen,
                          options=[parse_format(o) if isinstance(o, str) else o for o in options],
                          seed=seed, device=device, progress=False,
                          model_kind=str(seq.kind))
    est._check(ctx)
    try:
        by_block, tail = split_by_block(seq, chosen)
    except NotFactorable as e:
        raise InvalidParameterError(f"{e} (sequential mode)") from None
    meta = {"sequential": True, **dict(metadata or {})}
    if curvature is not None:
        term, squared, probes, budget_mb, split = curvature
        costs = curvature_sequential(seq, ctx, by_block, tail, term=term, squared=squared,
                                     budget_bytes=check_delta_budget(budget_mb), probes=probes,
                                     split=split, label=est.name)
        return est.table(ctx, costs, metadata={**meta, "peak_params": seq.peak_params})
    diagonal = isinstance(est, HessianProxyEstimator)
    rows: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for step in seq.steps(batches):
        block_units = by_block.get(step.index, [])
        if block_units:
            sums = _block_sums(step.module, f"{step.name}.", block_units, step.inputs, diagonal,
                               run=step.run)
            _score(est, seq.model, ctx, block_units, sums, rows)
    if tail:
        name = tail[0].module
        acc = InputHessian(_columns(seq.model.get_submodule(name)), diagonal=diagonal, device=device)
        for x, inp in zip(seq.head_inputs(), seq.final_inputs, strict=True):
            acc.add_batch(_real_tokens(x, inp.token_mask))
        _score(est, seq.model, ctx, tail, {name: acc}, rows)
    cost = np.stack([rows[u.name][0] for u in chosen])
    info: dict[str, Any] = {}
    for key in rows[chosen[0].name][1]:
        # per-unit info (salience's Σδ) comes back one block at a time: reassemble in unit order
        info[key] = [rows[u.name][1][key] for u in chosen]
    return est.table(ctx, UnitCosts(cost=cost, info=info), metadata={**meta, "peak_params": seq.peak_params})


def _curvature_terms(est: BaseEstimator) -> tuple[Any, bool, int, float, SplitTerm] | None:
    """(per-(sample, probe) term, squared deltas, probes, delta budget in MiB, its row split) of
    a sampled-curvature estimator, else None."""
    from sensitivity._curvature.terms import gn_diagonal_terms
    from sensitivity._fisher import FISHER_SPLIT, FisherEstimator
    from sensitivity._gauss_newton import GaussNewtonEstimator, gn_form

    if isinstance(est, GaussNewtonEstimator):
        term, split = gn_form(est.correlations)
        return term, False, est.probes, est.delta_budget_mb, split
    if isinstance(est, FisherEstimator) and est.target == "model":
        return gn_diagonal_terms, True, est.probes, est.delta_budget_mb, FISHER_SPLIT
    return None


def _columns(mod: torch.nn.Module) -> int:
    import torch

    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise InvalidParameterError(f"module {mod!r} has no 2-D weight; only Linear units are supported")
    return int(weight_view(mod).shape[1])


def _device(mod: torch.nn.Module) -> torch.device:
    """Where ``mod``'s parameters live (the sums are kept next to its inputs)."""
    return next(mod.parameters()).device


def _real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token rows of ``x`` [B, T, cols] whose attention mask is 1 (all rows when there is none)."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool().to(x.device)]
    return x


def _block_sums(block: torch.nn.Module, prefix: str, units: Sequence[Unit],
                inputs: Sequence[BlockInputs], diagonal: bool, *, run: Any) -> dict[str, InputHessian]:
    """Σ x xᵀ (or its diagonal) of each unit module's inputs over the block's cached batches."""
    import torch

    stats: dict[str, InputHessian] = {}
    current: list[torch.Tensor | None] = [None]
    handles = []
    for u in units:
        if u.module in stats:
            continue
        mod = block.get_submodule(u.module[len(prefix):])
        acc = stats[u.module] = InputHessian(_columns(mod), diagonal=diagonal, device=_device(mod))

        def hook(_m: Any, args: tuple[Any, ...], acc: InputHessian = acc) -> None:
            acc.add_batch(_real_tokens(args[0], current[0]))

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i, inp in enumerate(inputs):
                current[0] = inp.token_mask
                run(i)
    finally:
        for h in handles:
            h.remove()
    return stats


def _score(est: BaseEstimator, model: torch.nn.Module, ctx: EstimateContext, units: Sequence[Unit],
           stats: Mapping[str, InputHessian], rows: dict[str, tuple[np.ndarray, dict[str, Any]]]) -> None:
    """The estimator's own ``_finish`` on these units, while their weights are loaded."""
    check_tokens({n: s.tokens for n, s in stats.items()})
    partial = Partial(sums={f"H:{n}": s.total.cpu().numpy() for n, s in stats.items()},
                      counts={f"tokens:{n}": s.tokens for n, s in stats.items()})
    assert isinstance(est, HessianProxyEstimator | SalienceEstimator)
    out = est._finish(model, dataclasses.replace(ctx, units=list(units)), partial)
    cost = np.asarray(out.cost, dtype=np.float64)
    for i, u in enumerate(units):
        rows[u.name] = (cost[i], {k: v[i] for k, v in out.info.items()})
