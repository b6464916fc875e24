"""The sampling engine: stream ``r(g_{s,k})`` over every calibration sample s and output probe k,
``g = Jᵀ v`` by one backward per (row, probe) on the retained graph or one vmapped backward per
forward, and reduce the per-sample probe means to a mean and a standard error (package doc).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.model.data.batches import batch_rows
from allocator.model.outputs import forward_outputs
from sensitivity._base import EstimateContext
from sensitivity._curvature.output_metric import output_metric, row_cotangents
from sensitivity._curvature.reductions import Reduction, UnitReduction, streamed_reduce
from sensitivity._loss import differentiable_attention, gradient_mode, unit_leaves
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

__all__ = ["PER_SAMPLE_MODES", "VMAP_BELOW", "SampledCurvature", "check_chunk", "check_per_sample",
           "check_probes", "curvature_from_sums", "pair_curvature", "pair_stream", "pair_terms",
           "row_chunks", "sampled_curvature"]

PER_SAMPLE_MODES = ("auto", "loop", "vmap")
#: Below this many unit weights, "auto" vmaps the per-(sample, probe) backward on CPU.
VMAP_BELOW = 2_000_000


@dataclass(frozen=True, kw_only=True)
class SampledCurvature:
    """``mean`` = (1/T) Σ_s mean_k r(g_{s,k}) per (unit, column); ``sem`` its standard error."""

    mean: np.ndarray
    sem: np.ndarray
    samples: int
    positions: int
    probes: int
    metric: str

    def info(self) -> dict[str, Any]:
        return {"samples": self.samples, "positions": self.positions, "output_probes": self.probes,
                "output_metric": self.metric}


def sampled_curvature(model: torch.nn.Module, ctx: EstimateContext, reduce: Reduction, *,
                      probes: int = 2, chunk: int = 1, per_sample: str = "auto",
                      label: str = "gauss-newton") -> SampledCurvature:
    """Stream ``r(g_{s,k})`` over every calibration sample s and output probe k (package doc).

    ``chunk`` rows share one forward; each (row, probe) gets its own backward on the retained
    graph (``per_sample="loop"``) or one vmapped backward per forward (``"vmap"``). The draws
    come row by row from a CPU generator per batch (:meth:`EstimateContext.batch_generator`:
    seeded by ``ctx.seed`` and the batch's id), so results do not depend on ``chunk``,
    ``per_sample``, the device, or which shard of the batches a batch is estimated in.
    """
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    n_samples = n_positions = 0
    for count, terms in pair_stream(model, ctx, reduce, probes=probes, chunk=chunk,
                                    per_sample=per_sample, label=label):
        t = terms.sum(dim=0) / probes
        s1 = t if s1 is None else s1 + t
        s2 = t**2 if s2 is None else s2 + t**2
        n_samples += 1
        n_positions += count
    return curvature_from_sums(s1, s2, n_samples, n_positions, probes, output_metric(ctx.model_kind))


def pair_stream(model: torch.nn.Module, ctx: EstimateContext, reduce: Reduction, *, probes: int,
                chunk: int, per_sample: str, label: str) -> Iterator[tuple[int, torch.Tensor]]:
    """Per calibration row with a counted output position, in data order: (its positions,
    ``r(g_{row,k})`` stacked over the probes k). The engine of :func:`sampled_curvature`."""
    if per_sample not in PER_SAMPLE_MODES:
        raise InvalidParameterError(f"per_sample must be one of {PER_SAMPLE_MODES}, got {per_sample!r}")
    metric = output_metric(ctx.model_kind)
    leaves, _ = unit_leaves(model, ctx.units)
    n_weights = sum(t.numel() for t in leaves)
    batched = per_sample == "vmap" or (per_sample == "auto" and (
        not ctx.device.startswith("cpu") or n_weights < VMAP_BELOW))
    with gradient_mode(model, leaves), progress_bar(len(ctx.batches), f"{label} batches",
                                                     ctx.progress) as bar:
        for b, batch in enumerate(ctx.batches):
            gen = ctx.batch_generator(b)  # per batch: a shard of the batches draws the same
            for sub in row_chunks(batch, chunk):
                with differentiable_attention():
                    out = forward_outputs(model, sub, ctx.model_kind)
                cots, counts = row_cotangents(out, sub, ctx.model_kind, metric, probes, gen)
                yield from _row_terms(out, leaves, cots, counts, probes, reduce, batched)
                # the names would keep this row's graph and cotangents alive through the next
                # row's forward: two graphs at once (+0.4 GB on SmolLM2-135M, docs/memory.md)
                del out, cots
            bar.update(1)


def curvature_from_sums(s1: torch.Tensor | None, s2: torch.Tensor | None, n_samples: int, n_positions: int,
               probes: int, metric: str) -> SampledCurvature:
    """Mean and standard error over samples from the per-sample sums S₁, S₂ (package doc)."""
    if s1 is None or s2 is None or n_positions == 0:
        raise InvalidParameterError("no calibration sample has an output position to compare; "
                                    "pass non-empty texts")
    mean_s = (s1 / n_samples).cpu().numpy()
    var_s = ((s2 / n_samples).cpu().numpy() - mean_s**2) * n_samples / max(n_samples - 1, 1)
    scale = n_samples / n_positions  # per-sample sums → the metric's per-position mean
    sem = scale * np.sqrt(np.maximum(var_s, 0.0) / n_samples) if n_samples > 1 else 0 * mean_s
    return SampledCurvature(mean=scale * mean_s, sem=sem, samples=n_samples,
                            positions=n_positions, probes=probes, metric=metric)


def row_chunks(batch: Mapping[str, Any], chunk: int) -> list[dict[str, Any]]:
    """Sub-batches of ``chunk`` rows (tensors with the batch's leading size are sliced)."""
    import torch

    rows = batch_rows(batch)
    out = []
    for lo in range(0, rows, chunk):
        hi = min(lo + chunk, rows)
        out.append({k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows
                    else v for k, v in batch.items()})
    return out


def pair_terms(out: torch.Tensor, leaves: Sequence[torch.Tensor], cots: list[list[torch.Tensor]],
               pairs: Sequence[tuple[int, int]], reduce: Reduction, batched: bool) -> list[torch.Tensor]:
    """``r(g)`` with ``g = J_rowᵀ cots[row][k]`` for every (row, k) of ``pairs``, in order: one
    backward per pair on the retained graph, or one vmapped backward for all of them."""
    import torch

    def full(r: int, k: int) -> torch.Tensor:
        c = torch.zeros_like(out)
        c[r] = cots[r][k]
        return c

    def grad_of(cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = torch.autograd.grad(out, list(leaves), grad_outputs=cot, retain_graph=True,
                                  allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(res, leaves, strict=True))

    if not batched:
        if isinstance(reduce, UnitReduction):  # one weight's gradient alive at a time
            return [streamed_reduce(out, leaves, full(r, k), reduce) for r, k in pairs]
        return [reduce([g.detach() for g in grad_of(full(r, k))]) for r, k in pairs]
    stacked = torch.func.vmap(grad_of)(torch.stack([full(r, k) for r, k in pairs]))
    return [reduce([g[i].detach() for g in stacked]) for i in range(len(pairs))]


def _row_terms(out: torch.Tensor, leaves: Sequence[torch.Tensor], cots: list[list[torch.Tensor]],
               counts: list[int], probes: int, reduce: Reduction,
               batched: bool) -> list[tuple[int, torch.Tensor]]:
    """(positions, ``r(g_{row,k})`` stacked over k) for every row with a counted position."""
    import torch

    rows = [r for r in range(out.shape[0]) if counts[r] > 0]
    pairs = [(r, k) for r in rows for k in range(probes)]
    if not pairs:
        return []
    terms = pair_terms(out, leaves, cots, pairs, reduce, batched)
    return [(counts[r], torch.stack(terms[i * probes:(i + 1) * probes])) for i, r in enumerate(rows)]


def pair_curvature(terms: torch.Tensor, counts: Sequence[int], metric: str) -> SampledCurvature:
    """:func:`sampled_curvature`'s reduction of terms kept per pair, ``[samples, probes, ...]``
    (``counts``: each sample's positions): probe means per sample, then mean and standard error."""
    probes = int(terms.shape[1])
    t = terms.sum(dim=1) / probes
    return curvature_from_sums(t.sum(dim=0), (t**2).sum(dim=0), len(counts), sum(counts), probes, metric)


def check_probes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(f"probes must be an int ≥ 1 (output probes per sample), got {value!r}")
    return value


def check_chunk(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(f"chunk must be an int ≥ 1 (rows per forward), got {value!r}")
    return value


def check_per_sample(value: Any) -> str:
    if value not in PER_SAMPLE_MODES:
        raise InvalidParameterError(f"per_sample must be one of {PER_SAMPLE_MODES}, got {value!r}")
    return str(value)
