"""``measured``: quantize one unit at a time and measure the real output change (CalibTIP).

CalibTIP (arXiv 2006.10518) and exllama's optimizer measure ΔL_i(b) directly: only unit i is
quantized at option b (``ctx.quantizer``: RTN by default) and the output on calibration data is compared with
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat
from allocator.core.units import get_module, unit_weight
from allocator.model.data.batches import batch_rows
from allocator.model.distortion import Metric, distortion, per_sample_sums
from allocator.model.outputs import tokens_within
from sensitivity._activation_cache import BlockCache, make_chunks
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.quant import Quantizer

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


#: Values of the ``approx`` parameter: ``none`` (exact, the default), ``block-gain`` and
#: ``unit-gain`` (opt-in approximations, see :func:`measure_units`).
APPROX_MODES: tuple[str, ...] = ("none", "block-gain", "unit-gain")


def measure_units(
    model: torch.nn.Module,
    ctx: EstimateContext,
    unit_indices: Sequence[int] | None = None,
    *,
    metric: Metric | str = "auto",
    max_tokens: int = 8192,
    progress: bool | None = None,
    batch_options: bool = True,
    approx: str = "none",
) -> MeasuredRows:
    """Measure cost(i, b) for the units ``ctx.units[i]``, i in ``unit_indices`` (all if None).

    This is the shardable core of ``measured``: call it on disjoint index sets in separate
    processes (or Optuna workers) and combine with :func:`merge_measured`.

    ``batch_options`` (default) runs several options of one unit in one forward: the chunk's
    rows are stacked once per option along the batch dimension and the unit's module applies
    option b's weight to copy b, so the downstream blocks see one n·R-row batch instead of n
    R-row batches (same arithmetic, larger matrix products, fewer calls). At most
    ``max_tokens`` tokens go through one forward. Units whose weight is shared with another
    module, or whose module does not see batch-first inputs, use one forward per option;
    ``batch_options=False`` is that reference loop for every unit.

    ``approx="block-gain"`` (opt-in, not exact) measures, for a unit in block k, only the
    relative error of block k's output, e(i, b) = Σ_t ‖h'_t − h_t‖² / Σ_t ‖h_t‖² per sample, and
    scales it by a per-block gain g_k = cost(u_k, b*) / e(u_k, b*) measured exactly once on the
    block's first unit u_k at the middle option b* (cost(i, b) ≈ g_k · e(i, b), per batch).
    ``approx="unit-gain"`` (opt-in, not exact) is the same with one gain per unit, g_i =
    cost(i, b*) / e(i, b*): one exact trial per unit instead of one per block.
    Units outside the blocks are always measured exactly.

    Raises:
        InvalidParameterError: no calibration batches, a bad index, metric or approx mode.
    """
    import torch
    from tqdm.auto import tqdm

    if not ctx.batches:
        raise InvalidParameterError(
            "estimator 'measured' needs calibration data; pass --data or use the built-in corpus"
        )
    idx = list(range(len(ctx.units))) if unit_indices is None else [int(i) for i in unit_indices]
    bad = [i for i in idx if not 0 <= i < len(ctx.units)]
    if bad:
        raise InvalidParameterError(f"unit indices {bad[:5]} out of range 0..{len(ctx.units) - 1}")
    _check_approx(approx)
    met = default_metric(ctx.model_kind) if metric == "auto" else _metric(metric)
    n_opt, n_batches = len(ctx.options), len(ctx.batches)
    was_training = model.training
    model.eval()
    torch.manual_seed(ctx.seed)
    # a chunk's logits (and its stacked options') within OUTPUT_CHUNK_BYTES: a large vocabulary
    # gets smaller chunks
    max_tokens = tokens_within(model, ctx.model_kind, max_tokens)
    try:
        cache = BlockCache(model, make_chunks(ctx.batches, max_tokens=max_tokens), kind=ctx.model_kind)
        origin = torch.cat([c.origin.cpu() for c in cache.chunks]).numpy()
        cost = np.zeros((len(idx), n_opt))
        std = np.zeros((len(idx), n_opt))
        means = np.zeros((len(idx), n_opt, n_batches))
        starts = [cache.start_block(ctx.units[i]) for i in idx]
        runner = _Runner(cache=cache, met=met, max_tokens=max_tokens, batch=batch_options)
        gains: dict[int, float] = {}
        show = ctx.progress if progress is None else progress
        bar = tqdm(total=len(idx) * n_opt, desc="measured", disable=not show, leave=False)
        for r, i in enumerate(idx):
            unit = ctx.units[i]
            view = unit_weight(model, unit)
            with torch.no_grad():
                original = view.detach().clone()
            per_unit = partial(_in_option_groups, original, ctx.options, unit, ctx.quantizer)
            block = cache.block_of(unit) if approx != "none" else None
            if block is None:
                sums = per_unit(partial(runner.output_sums, unit, view, original, start=starts[r]))
            elif approx == "unit-gain":
                mid = n_opt // 2
                errs = per_unit(partial(runner.block_sums, unit, view, original, block=block))
                with torch.no_grad():
                    q_mid = [ctx.quantizer.quantize(unit, original, ctx.options[mid])]
                (s_mid, n_mid), = runner.output_sums(unit, view, original, q_mid, starts[r])
                gain = _gain(_cost_stats(s_mid, n_mid, origin, n_batches)[0],
                             _cost_stats(*errs[mid], origin, n_batches)[0])
                sums = [(gain * s, n) for s, n in errs]
                sums[mid] = (s_mid, n_mid)  # the reference trial is exact: keep it as measured
            else:
                if block not in gains:
                    gains[block] = _block_gain(runner, ctx, block, origin, n_batches)
                errs = per_unit(partial(runner.block_sums, unit, view, original, block=block))
                sums = [(gains[block] * s, n) for s, n in errs]
            for j, (s, n) in enumerate(sums):
                cost[r, j], std[r, j], means[r, j] = _cost_stats(s, n, origin, n_batches)
            bar.update(n_opt)
        bar.close()
    finally:
        model.train(was_training)
    info: dict[str, Any] = {"metric": str(met), "n_batches": n_batches, "n_chunks": len(cache.chunks),
                            "n_blocks": cache.n_blocks, "start_blocks": starts,
                            "forwards": runner.forwards, "approx": approx}
    if gains:
        info["block_gains"] = {k: gains[k] for k in sorted(gains)}
    return MeasuredRows(unit_indices=tuple(idx), cost=cost, cost_std=std, batch_means=means, info=info)


#: Quantized copies of one unit's weight held at once (the 32000 × 2048 head of a 1B model is
#: 262 MB per option: all eight at once were 2.1 GB).
QUANTIZED_BUDGET_BYTES = 256 * 2**20

Sums = list[tuple[np.ndarray, np.ndarray]]


def _in_option_groups(original: torch.Tensor, options: Sequence[QuantFormat], unit: Unit,
                      quantizer: Quantizer, measure: Callable[[list[torch.Tensor]], Sums]) -> Sums:
    """``measure`` over the unit's options in groups whose quantized weights fit
    :data:`QUANTIZED_BUDGET_BYTES` (each quantized once, reused for every chunk and pass of its
    group); the results of all options, in order. A small unit is one group: all its options."""
    import torch

    per = max(1, QUANTIZED_BUDGET_BYTES // max(1, original.numel() * original.element_size()))
    out: Sums = []
    for g0 in range(0, len(options), per):
        with torch.no_grad():
            quantized = [quantizer.quantize(unit, original, fmt) for fmt in options[g0:g0 + per]]
        out.extend(measure(quantized))
        del quantized
    return out


class _NotBatchFirst(Exception):
    """The unit's module saw an input whose leading dim is not the stacked batch (internal)."""


class _Runner:
    """Runs trials of one unit over every chunk: several options per forward where it can.

    ``forwards`` counts the work done in forward-pass equivalents (tokens × blocks recomputed,
    over tokens × n_blocks of one full pass), for the speed floor reported by the benchmark.
    """

    def __init__(self, *, cache: Any, met: Metric, max_tokens: int, batch: bool) -> None:
        self.cache, self.met, self.max_tokens, self.batch = cache, met, max_tokens, batch
        self.tokens = [_chunk_tokens(c.batch) for c in cache.chunks]
        self.total_tokens = max(1, sum(self.tokens))
        self.forwards = 0.0

    def _per_pass(self, ci: int, n_opt: int, unit: Any) -> int:
        """Options per forward for chunk ``ci``: all that fit in ``max_tokens`` tokens."""
        if not self.batch or n_opt == 1 or self.cache.shares_weight(unit):
            return 1
        return max(1, min(n_opt, self.max_tokens // max(1, self.tokens[ci])))

    def _passes(self, unit: Any, view: torch.Tensor, original: torch.Tensor,
                quantized: list[torch.Tensor], run: Any) -> Iterator[tuple[int, list[int], Any]]:
        """(chunk, option indices, stacked output of ``run(ci, n)``) for every pass of the unit."""
        import torch

        module = get_module(self.cache.model, unit.module)
        batchable = True
        for ci, chunk in enumerate(self.cache.chunks):
            rows = batch_rows(chunk.batch)
            per = self._per_pass(ci, len(quantized), unit) if batchable else 1
            g0 = 0
            while g0 < len(quantized):
                group = list(range(g0, min(len(quantized), g0 + per)))
                try:
                    with _option_weights(module, view, original, [quantized[j] for j in group],
                                         rows):
                        with torch.inference_mode():
                            out = run(ci, len(group))
                except _NotBatchFirst:
                    # Flattened / routed inputs: copies cannot be told apart, one option per pass.
                    batchable, per = False, 1
                    continue
                yield ci, group, out
                g0 += len(group)

    def output_sums(self, unit: Any, view: torch.Tensor, original: torch.Tensor,
                    quantized: list[torch.Tensor], start: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-sample masked sums and counts of D(f(x), f_{i,b}(x)) for every option b."""
        import torch

        cache = self.cache
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in quantized]
        frac = 1.0 if start <= 0 or not cache.n_blocks else (cache.n_blocks - start) / cache.n_blocks
        for ci, group, out in self._passes(
                unit, view, original, quantized,
                lambda ci, n: cache.outputs_from(ci, start, repeat=n)):
            rows = batch_rows(cache.chunks[ci].batch)
            ref = cache.reference[ci]  # read once per pass (it may come from disk)
            with torch.inference_mode():
                for k, j in enumerate(group):
                    s, n = per_sample_sums(distortion(self.met, ref, out[k * rows:(k + 1) * rows]),
                                           cache.chunks[ci].mask)
                    parts[j].append((s.cpu().numpy(), n.cpu().numpy()))
            self.forwards += len(group) * frac * self.tokens[ci] / self.total_tokens
        return [_joined(p) for p in parts]

    def block_sums(self, unit: Any, view: torch.Tensor, original: torch.Tensor,
                   quantized: list[torch.Tensor], block: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-sample sums of ‖Δh‖² / ‖h‖² at block ``block``'s output (see
        :func:`measure_units`) and per-sample token counts, for every option."""
        import torch

        cache = self.cache
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in quantized]
        for ci, group, out in self._passes(
                unit, view, original, quantized,
                lambda ci, n: cache.block_output(ci, block, repeat=n)):
            chunk = cache.chunks[ci]
            rows = batch_rows(chunk.batch)
            with torch.inference_mode():
                ref = cache.cached_block_output(ci, block).double()
                mask = _token_mask(chunk.batch, ref)
                energy = per_sample_sums((ref * ref).sum(-1), mask)[0]
                for k, j in enumerate(group):
                    d = out[k * rows:(k + 1) * rows].double() - ref
                    s, n = per_sample_sums((d * d).sum(-1), mask)
                    # Relative error per sample, spread over its tokens so that the per-batch
                    # token-weighted mean of _cost_stats is the batch's mean relative error.
                    parts[j].append(((s / energy.clamp_min(1e-30) * n).cpu().numpy(), n.cpu().numpy()))
            self.forwards += len(group) * self.tokens[ci] / (self.total_tokens * max(1, cache.n_blocks))
        return [_joined(p) for p in parts]


def _block_gain(runner: _Runner, ctx: EstimateContext, block: int, origin: np.ndarray,
                n_batches: int) -> float:
    """g_k = cost / e of the first unit of block k at the middle option, measured exactly once."""
    import torch

    cache = runner.cache
    unit = next(u for u in ctx.units if cache.block_of(u) == block)
    fmt = ctx.options[len(ctx.options) // 2]
    view = unit_weight(cache.model, unit)
    with torch.no_grad():
        original = view.detach().clone()
        quantized = [ctx.quantizer.quantize(unit, original, fmt)]
    (s, n), = runner.output_sums(unit, view, original, quantized, cache.start_block(unit))
    (es, en), = runner.block_sums(unit, view, original, quantized, block)
    # Both as the estimator averages them (mean of per-batch means), so that the reference
    # trial itself comes out exact.
    return _gain(_cost_stats(s, n, origin, n_batches)[0], _cost_stats(es, en, origin, n_batches)[0])


def _gain(cost: float, err: float) -> float:
    """Output distortion per unit of relative block-output error (0 when the error is 0)."""
    return cost / err if err > 0 else 0.0


@contextmanager
def _option_weights(module: torch.nn.Module, view: torch.Tensor, original: torch.Tensor,
                    weights: list[torch.Tensor], rows: int) -> Iterator[None]:
    """Within the block: the unit's weight is ``weights[0]``, or, for several weights, the
    module's forward applies ``weights[b]`` to rows b·R..(b+1)·R of its batch-first input.
    The original weight is restored bit for bit on exit."""
    import torch

    patched = len(weights) > 1
    if patched:
        own = vars(module).get("forward")
        inner = module.forward
        n = len(weights)

        def forward(x: Any, *a: Any, **k: Any) -> Any:
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != n * rows:
                raise _NotBatchFirst
            outs = []
            for w, xp in zip(weights, x.split(rows), strict=True):
                with torch.no_grad():
                    view.copy_(w)
                outs.append(inner(xp, *a, **k))
            return torch.cat(outs)

        module.forward = forward
    else:
        with torch.no_grad():
            view.copy_(weights[0])
    try:
        yield
    finally:
        if patched:
            if own is None:
                del module.forward
            else:
                module.forward = own
        with torch.no_grad():
            view.copy_(original)


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _chunk_tokens(batch: Any) -> int:
    ids = batch.get("input_ids")
    width = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1
    return batch_rows(batch) * width


def _token_mask(batch: Any, hidden: torch.Tensor) -> torch.Tensor | None:
    """The attention mask when it matches the hidden state's [rows, T]; else every position."""
    am = batch.get("attention_mask")
    if hidden.dim() == 3 and am is not None and tuple(am.shape) == tuple(hidden.shape[:2]):
        return am.bool()
    return None


def _check_approx(value: str) -> None:
    if value not in APPROX_MODES:
        raise InvalidParameterError(f"approx {value!r} is unknown; choose {', '.join(APPROX_MODES)}")


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
        batch_options: several options of a unit per forward (exact; see :func:`measure_units`).
        approx: ``none`` (exact) or ``block-gain`` (opt-in approximation, see
            :func:`measure_units`).
    """

    name: ClassVar[str] = "measured"
    needs_data: ClassVar[bool] = True

    def __init__(self, *, metric: str = "auto", max_tokens: int = 8192, workers: int = 1,
                 batch_options: bool = True, approx: str = "none") -> None:
        if metric != "auto":
            _metric(metric)
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidParameterError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(workers, int) or workers <= 0:
            raise InvalidParameterError(f"workers must be a positive int, got {workers!r}")
        if not isinstance(batch_options, bool):
            raise InvalidParameterError(f"batch_options must be a bool, got {batch_options!r}")
        _check_approx(approx)
        self.metric = metric
        self.max_tokens = max_tokens
        self.workers = workers
        self.batch_options = batch_options
        self.approx = approx

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        kw: dict[str, Any] = {"metric": self.metric, "max_tokens": self.max_tokens,
                              "batch_options": self.batch_options, "approx": self.approx}
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
    keys = ("metric", "n_batches", "n_blocks") + (("approx",) if part.info.get("approx", "none") != "none"
                                                    else ())
    return {k: part.info[k] for k in keys if k in part.info}
