"""``measured``: quantize one unit at a time and measure the real output change (CalibTIP).

CalibTIP (arXiv 2006.10518) and exllama's optimizer measure ΔL_i(b) directly: only unit i is
quantized at option b (shared RTN quantizer) and the output on calibration data is compared with
full precision. The cost is

    cost(i, b) = (1/N_B) Σ_batches  mean_{tokens or samples of the batch} D(f(x), f_{i,b}(x))

with D the metric of :mod:`allocator.model.distortion` (KL of logits for LMs and classifiers, 1 − cos
or MSE of the sentence embedding for encoders) and ``cost_std`` = std over batches (ddof 1) of the
per-batch means / √N_B (with a single batch: std over samples / √n_samples).

Speed: :class:`~sensitivity._activation_cache.BlockCache` skips the blocks before the unit, rows
are regrouped into length-sorted chunks, and :func:`measure_units` is the shard function — any
subset of unit indices can be measured in any process and merged with :func:`merge_measured`.
The weights are restored bit for bit after every trial.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.model.distortion import Metric, distortion, per_sample_sums
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts

if TYPE_CHECKING:
    import torch

__all__ = [
    "MeasuredEstimator",
    "MeasuredRows",
    "default_metric",
    "measure_units",
    "merge_measured",
    "shard_units",
]


def default_metric(model_kind: str) -> Metric:
    """KL for models with logits, 1 − cos for encoders."""
    return Metric.COS if model_kind == "encoder" else Metric.KL


@dataclass(frozen=True, kw_only=True)
class MeasuredRows:
    """Measured costs of a subset of units (one shard), rows in ``unit_indices`` order."""

    unit_indices: tuple[int, ...]  #: indices into ``ctx.units``
    cost: np.ndarray  #: (len(unit_indices), n_options)
    cost_std: np.ndarray  #: same shape
    batch_means: np.ndarray  #: (len(unit_indices), n_options, n_batches)
    info: dict[str, Any] = field(default_factory=dict)


def shard_units(n_units: int, n_shards: int) -> list[list[int]]:
    """Split unit indices into ``n_shards`` interleaved shards (units are in block order, so each
    shard gets early and late blocks alike and a similar amount of work)."""
    if n_shards <= 0:
        raise InvalidParameterError(f"n_shards must be > 0, got {n_shards}")
    return [s for s in (list(range(k, n_units, n_shards)) for k in range(n_shards)) if s]


def merge_measured(parts: Sequence[MeasuredRows], n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Assemble shards into full (n_units × n_options) cost and cost_std matrices."""
    if not parts:
        raise InvalidParameterError("merge_measured needs at least one shard")
    n_opt = parts[0].cost.shape[1]
    cost = np.full((n_units, n_opt), np.nan)
    std = np.full((n_units, n_opt), np.nan)
    for p in parts:
        idx = list(p.unit_indices)
        cost[idx], std[idx] = p.cost, p.cost_std
    missing = np.flatnonzero(np.isnan(cost).any(axis=1))
    if missing.size:
        raise InvalidParameterError(f"shards do not cover units {missing[:5].tolist()}; measure every unit")
    return cost, std


def _cost_stats(sums: np.ndarray, counts: np.ndarray, origin: np.ndarray,
                n_batches: int) -> tuple[float, float, np.ndarray]:
    """(cost, cost_std, per-batch means) from per-sample masked sums and counts."""
    b_sum = np.bincount(origin, weights=sums, minlength=n_batches)
    b_cnt = np.bincount(origin, weights=counts, minlength=n_batches)
    means = b_sum / np.maximum(b_cnt, 1.0)
    cost = float(means.mean())
    if n_batches >= 2:
        std = float(means.std(ddof=1) / math.sqrt(n_batches))
    else:
        per_sample = sums / np.maximum(counts, 1.0)
        n = len(per_sample)
        std = float(per_sample.std(ddof=1) / math.sqrt(n)) if n >= 2 else 0.0
    return cost, std, means


def measure_units(
    model: torch.nn.Module,
    ctx: EstimateContext,
    unit_indices: Sequence[int] | None = None,
    *,
    metric: Metric | str = "auto",
    max_tokens: int = 8192,
    progress: bool | None = None,
) -> MeasuredRows:
    """Measure cost(i, b) for the units ``ctx.units[i]``, i in ``unit_indices`` (all if None).

    This is the shardable core of ``measured``: call it on disjoint index sets in separate
    processes (or Optuna workers) and combine with :func:`merge_measured`.

    Raises:
        InvalidParameterError: no calibration batches, a bad index or metric.
    """
    import torch
    from tqdm.auto import tqdm

    from allocator.core.units import unit_weight
    from allocator.model.quant import fake_quantize
    from sensitivity._activation_cache import BlockCache, make_chunks

    if not ctx.batches:
        raise InvalidParameterError(
            "estimator 'measured' needs calibration data; pass --data or use the built-in corpus"
        )
    idx = list(range(len(ctx.units))) if unit_indices is None else [int(i) for i in unit_indices]
    bad = [i for i in idx if not 0 <= i < len(ctx.units)]
    if bad:
        raise InvalidParameterError(f"unit indices {bad[:5]} out of range 0..{len(ctx.units) - 1}")
    met = default_metric(ctx.model_kind) if metric == "auto" else _metric(metric)
    n_opt, n_batches = len(ctx.options), len(ctx.batches)
    was_training = model.training
    model.eval()
    torch.manual_seed(ctx.seed)
    try:
        cache = BlockCache(model, make_chunks(ctx.batches, max_tokens=max_tokens), kind=ctx.model_kind)
        origin = torch.cat([c.origin for c in cache.chunks]).numpy()
        cost = np.zeros((len(idx), n_opt))
        std = np.zeros((len(idx), n_opt))
        means = np.zeros((len(idx), n_opt, n_batches))
        starts = [cache.start_block(ctx.units[i]) for i in idx]
        show = ctx.progress if progress is None else progress
        bar = tqdm(total=len(idx) * n_opt, desc="measured", disable=not show, leave=False)
        for r, i in enumerate(idx):
            view = unit_weight(model, ctx.units[i])
            with torch.no_grad():
                original = view.detach().clone()
            for j, fmt in enumerate(ctx.options):
                with torch.no_grad():
                    view.copy_(fake_quantize(original, fmt))
                try:
                    sums, counts = _trial(cache, starts[r], met)
                finally:
                    with torch.no_grad():
                        view.copy_(original)
                cost[r, j], std[r, j], means[r, j] = _cost_stats(sums, counts, origin, n_batches)
                bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    info = {"metric": str(met), "n_batches": n_batches, "n_chunks": len(cache.chunks),
            "n_blocks": cache.n_blocks, "start_blocks": starts}
    return MeasuredRows(unit_indices=tuple(idx), cost=cost, cost_std=std, batch_means=means, info=info)


def _trial(cache: Any, start: int, met: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample masked sums and counts of the metric over all chunks (one unit × option)."""
    import torch

    sums, counts = [], []
    with torch.inference_mode():
        for ci, chunk in enumerate(cache.chunks):
            out = cache.outputs_from(ci, start)
            s, n = per_sample_sums(distortion(met, cache.reference[ci], out), chunk.mask)
            sums.append(s.numpy())
            counts.append(n.numpy())
    return np.concatenate(sums), np.concatenate(counts)


def _metric(value: Metric | str) -> Metric:
    try:
        return Metric(value)
    except ValueError:
        raise InvalidParameterError(
            f"metric {value!r} is unknown; choose auto, {', '.join(m.value for m in Metric)}"
        ) from None


def _worker(payload: bytes, indices: list[int], kw: dict[str, Any], threads: int) -> MeasuredRows:
    import torch

    torch.set_num_threads(threads)
    model, ctx = torch.load(io.BytesIO(payload), weights_only=False)
    return measure_units(model, ctx, indices, progress=False, **kw)


class MeasuredEstimator(BaseEstimator):
    """CalibTIP-style measured ΔL per (unit, option) (arXiv 2006.10518); see the module doc.

    Args:
        metric: ``auto`` (KL for LMs/classifiers, ``cos`` for encoders), ``kl``, ``cos``, ``mse``.
        max_tokens: tokens per chunk (larger = faster matrix products, more memory).
        workers: processes (spawned, units split by :func:`shard_units`, results merged).
    """

    name: ClassVar[str] = "measured"
    needs_data: ClassVar[bool] = True

    def __init__(self, *, metric: str = "auto", max_tokens: int = 8192, workers: int = 1) -> None:
        if metric != "auto":
            _metric(metric)
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidParameterError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(workers, int) or workers <= 0:
            raise InvalidParameterError(f"workers must be a positive int, got {workers!r}")
        self.metric = metric
        self.max_tokens = max_tokens
        self.workers = workers

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        kw: dict[str, Any] = {"metric": self.metric, "max_tokens": self.max_tokens}
        shards = shard_units(len(ctx.units), self.workers)
        if len(shards) <= 1:
            part = measure_units(model, ctx, **kw)
            return UnitCosts(cost=part.cost, cost_std=part.cost_std, info=_public_info(part))
        parts = self._parallel(model, ctx, shards, kw)
        cost, std = merge_measured(parts, len(ctx.units))
        return UnitCosts(cost=cost, cost_std=std, info=_public_info(parts[0]))

    def _parallel(self, model: torch.nn.Module, ctx: EstimateContext,
                  shards: list[list[int]], kw: dict[str, Any]) -> list[MeasuredRows]:
        import concurrent.futures as cf

        import torch
        import torch.multiprocessing as tmp

        buf = io.BytesIO()
        # A private serialised copy: workers quantize in place, so they must not share storage.
        torch.save((model, _portable(ctx)), buf)
        payload = buf.getvalue()
        threads = max(1, torch.get_num_threads() // len(shards))
        with cf.ProcessPoolExecutor(max_workers=len(shards), mp_context=tmp.get_context("spawn")) as ex:
            futures = [ex.submit(_worker, payload, s, kw, threads) for s in shards]
            return [f.result() for f in futures]


def _portable(ctx: EstimateContext) -> EstimateContext:
    from dataclasses import replace

    return replace(ctx, batches=[dict(b) for b in ctx.batches], progress=False)


def _public_info(part: MeasuredRows) -> dict[str, Any]:
    return {k: part.info[k] for k in ("metric", "n_batches", "n_blocks") if k in part.info}
