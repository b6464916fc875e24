"""Task-loss Hessian machinery shared by ``hessian-trace`` and ``hessian-eig``, and the probe
stopping rule of the Hutchinson traces.

The task-loss Hessian is that of the task loss ``L`` of :mod:`sensitivity._loss` (mean over every
calibration sample) with respect to the unit weights only; ``H_i`` is the diagonal block of
unit i (a column-group unit takes the sub-block of its columns). Hessian-vector products come
from double backprop (Pearlmutter): ``H v = ∂(gᵀv)/∂W`` with ``g = ∂L/∂W`` built with
``create_graph=True``.

Probe throughput. The first-order graph of a batch is built once per *round* of probes and every
probe of the round reuses it (PyHessian's data-loader mode rebuilds the forward and backward for
every probe). Within a round the products are either a loop over the probes on the retained
graph (``probe_mode="loop"``, the fastest on CPU) or one vmapped double backward over the stacked
probes (``"vmap"``, ``torch.func.vmap`` over ``autograd.grad``; faster on GPU). ``"auto"`` picks by device.
``benchmarks/hutchinson.py`` measures both against the one-probe-at-a-time loop.

Stopping rule (:class:`ProbeRule`). A *probe* is one i.i.d. draw ``t_p`` (a vector over units) of
an unbiased estimate of every unit's trace over the whole calibration set. After m probes

    Tr_u ≈ t̄_u = (1/m) Σ_p t_{p,u},   SEM_u = sd_p(t_{p,u}) / √m   (sd with ddof = 1),

and the probes stop after the first round that ends with m ≥ ``min_probes`` and
``SEM_u ≤ rel_sem · |t̄_u|`` for every unit u, or at ``max_probes``. ``rel_sem = 0`` turns the rule
off: exactly ``max_probes`` probes. The SEM is the Monte-Carlo error of the probes *given* the
calibration data (the quantity the probes can shrink); the variability between calibration
samples is not part of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from sensitivity._base import EstimateContext
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

__all__ = [
    "PROBE_MODES",
    "ProbeRule",
    "batched_products",
    "check_int",
    "check_rel_sem",
    "check_tol",
    "first_order_graph",
    "graphs",
    "hutchinson_traces",
    "hvp",
    "rademacher_probes",
    "running_mean_converged",
    "trace_and_sem",
]

PROBE_MODES = ("auto", "loop", "vmap")


# ------------------------------------------------------------------ the stopping rule
def trace_and_sem(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the mean of the probe draws (probes, units) and its standard error
    ``sd(ddof=1)/√m`` (0 with a single probe: no spread to measure)."""
    m = samples.shape[0]
    trace = samples.mean(axis=0)
    if m < 2:
        return trace, np.zeros_like(trace)
    return trace, samples.std(axis=0, ddof=1) / math.sqrt(m)


@dataclass(frozen=True, kw_only=True)
class ProbeRule:
    """Probe until ``SEM_u ≤ rel_sem · |Tr_u|`` for every unit (checked at the end of each round
    once ``min_probes`` probes are in), or ``max_probes`` (module doc). ``rel_sem = 0``: always
    exactly ``max_probes``."""

    rel_sem: float = 0.0
    min_probes: int = 2
    max_probes: int = 100

    def __post_init__(self) -> None:
        check_rel_sem(self.rel_sem)
        check_int("max_probes", self.max_probes, 2, "a standard error needs two probes")
        check_int("min_probes", self.min_probes, 2, "a standard error needs two probes")
        if self.min_probes > self.max_probes:
            raise InvalidParameterError(
                f"min_probes={self.min_probes} is above max_probes={self.max_probes}; "
                "raise max_probes or lower min_probes")

    @property
    def fixed(self) -> bool:
        return self.rel_sem == 0

    def round_size(self, done: int, per_round: int) -> int:
        """Probes in the next round: ``per_round``, cut so as not to pass the cap."""
        return min(per_round, self.max_probes - done)

    def converged(self, samples: np.ndarray) -> np.ndarray:
        """Per unit: does the standard error meet the target? (≤, so an exact-zero trace with a
        zero SEM, e.g. a unit the output never reaches, counts as converged.)"""
        trace, sem = trace_and_sem(samples)
        return np.asarray(sem <= self.rel_sem * np.abs(trace))

    def done(self, samples: np.ndarray) -> bool:
        m = samples.shape[0]
        if m >= self.max_probes:
            return True
        return not self.fixed and m >= self.min_probes and bool(self.converged(samples).all())


def check_int(name: str, value: Any, low: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        reason = f" ({why})" if why else ""
        raise InvalidParameterError(f"{name} must be an int ≥ {low}{reason}, got {value!r}")
    return value


def check_rel_sem(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and 0 <= value < 1):
        raise InvalidParameterError(
            f"rel_sem must be a number in [0, 1) (target standard error as a fraction of |trace|,"
            f" e.g. 0.05; 0 runs exactly max_probes), got {value!r}")
    return float(value)


def check_tol(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value >= 0):
        raise InvalidParameterError(f"tol must be a finite number ≥ 0, got {value!r}")
    return float(value)


# ------------------------------------------------------------------ Hessian-vector products
def first_order_graph(model: torch.nn.Module, batch: Any, kind: str,
                      leaves: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], int]:
    """``g = ∂L_b/∂W`` with its graph kept (for double backprop) and the batch's sample count.

    Leaves the loss does not reach (e.g. a pooler an encoder loss does not use) get ``None``:
    their Hessian block is zero.
    """
    import torch

    with differentiable_attention():
        losses = per_sample_losses(model, batch, kind)
        if losses.numel() == 0:
            return [None] * len(leaves), 0
        loss = losses.mean()
        grads = torch.autograd.grad(loss, list(leaves), create_graph=True, allow_unused=True)
    return [g if g is not None and g.requires_grad else None for g in grads], int(losses.numel())


def hvp(grads: Sequence[torch.Tensor | None], leaves: Sequence[torch.Tensor],
        vectors: Sequence[torch.Tensor], *, batched: bool = False) -> list[torch.Tensor]:
    """``H v`` on a retained first-order graph (Pearlmutter's double backprop).

    ``vectors`` are shaped like ``leaves`` (with a leading probe dimension when ``batched``:
    one ``torch.func.vmap`` over the double backward for every probe at once; the legacy
    ``is_grads_batched`` path lacks batching rules for layer norm / softmax backward and falls
    back to a slow per-probe loop).
    """
    import torch

    used = [i for i, g in enumerate(grads) if g is not None]
    outputs = [g for g in grads if g is not None]
    out = [torch.zeros_like(v) for v in vectors]
    if not used:
        return out
    inputs = [leaves[i] for i in used]

    def product(*vs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = torch.autograd.grad(outputs, inputs, grad_outputs=list(vs), retain_graph=True,
                                  allow_unused=True)
        return tuple(torch.zeros_like(v) if r is None else r for r, v in zip(res, vs, strict=True))

    vs = [vectors[i] for i in used]
    res = torch.func.vmap(product)(*vs) if batched else product(*vs)
    for i, r in zip(used, res, strict=True):
        out[i] = r.detach()
    return out


def rademacher_probes(leaves: Sequence[torch.Tensor], count: int,
                      generator: torch.Generator) -> list[list[torch.Tensor]]:
    """``count`` Rademacher vectors (±1) shaped like ``leaves``, drawn on CPU in a fixed order
    (probe by probe, leaf by leaf) so that a seed gives the same probes on every device and
    whatever the round size."""
    import torch

    out = []
    for _ in range(count):
        out.append([(torch.randint(0, 2, tuple(t.shape), generator=generator, dtype=torch.int8)
                     .to(device=t.device, dtype=t.dtype) * 2 - 1) for t in leaves])
    return out


def running_mean_converged(samples: np.ndarray, tol: float) -> int | None:
    """First probe count m ≥ 2 at which every unit's running mean moved by less than ``tol``
    relatively: ``|mean_m − mean_{m−1}| / (|mean_{m−1}| + 1e-6) < tol`` (PyHessian's test);
    ``samples`` is (probes, units). None if no such m."""
    m = samples.shape[0]
    if m < 2:
        return None
    means = np.cumsum(samples, axis=0) / np.arange(1, m + 1)[:, None]
    change = np.abs(means[1:] - means[:-1]) / (np.abs(means[:-1]) + 1e-6)
    ok = np.nonzero(change.max(axis=1) < tol)[0]
    return int(ok[0]) + 2 if ok.size else None


def unit_quadratics(units: Sequence[Any], index: Sequence[int], z: Sequence[torch.Tensor],
                     hz: Sequence[torch.Tensor]) -> np.ndarray:
    """``z_iᵀ (H z)_i`` per unit: an unbiased estimate of Tr(H_i) (cross terms have mean 0)."""
    return np.array([float((unit_block(z[k], u) * unit_block(hz[k], u)).sum())
                     for u, k in zip(units, index, strict=True)])


def hutchinson_traces(
    model: torch.nn.Module, ctx: EstimateContext, *, rel_sem: float = 0.0, min_probes: int = 2,
    max_probes: int = 100, tol: float = 0.0, probes_per_round: int = 8, probe_mode: str = "auto",
    cache_graphs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Tr(H_i) draws per probe, (probes, units): HAWQ-V2's Hutchinson estimator.

    ``Tr(H_i) ≈ (1/m) Σ_p z_pᵢᵀ (H z_p)_i`` with z_p Rademacher over all unit weights; one probe
    is one z applied to the Hessian of the loss over the *whole* calibration set (one
    Hessian-vector product per batch), so the draws are i.i.d. given the data. The probes stop by
    :class:`ProbeRule` (``rel_sem``, ``min_probes``, ``max_probes``; checked after each round of
    ``probes_per_round``, and every probe of a finished round is kept). ``tol > 0`` adds
    PyHessian's running-mean test (:func:`running_mean_converged`, truncated to the first probe
    count where it holds; kept for the benchmarks). The probes are drawn in a fixed order, so with
    ``rel_sem = 0`` the draws do not depend on ``probes_per_round``. Also returns the leaf sizes.
    """
    import torch

    rule = ProbeRule(rel_sem=rel_sem, min_probes=min_probes, max_probes=max_probes)
    check_tol(tol)
    check_int("probes_per_round", probes_per_round, 1)
    leaves, index = unit_leaves(model, ctx.units)
    batched = batched_products(probe_mode, ctx.device)
    gen = torch.Generator().manual_seed(ctx.seed)
    samples = np.zeros((0, len(ctx.units)))
    cached: list[tuple[list[torch.Tensor | None], int]] = []
    with gradient_mode(model, leaves), progress_bar(max_probes, "hessian-trace probes",
                                                     ctx.progress) as bar:
        while True:
            k = rule.round_size(samples.shape[0], probes_per_round)
            probes = rademacher_probes(leaves, k, gen)
            acc = np.zeros((k, len(ctx.units)))
            total = 0
            for grads, n in graphs(model, ctx, leaves, cached, cache_graphs):
                total += n
                for p, hz in _products(grads, leaves, probes, batched):
                    acc[p] += n * unit_quadratics(ctx.units, index, probes[p], hz)
            if total == 0:
                raise InvalidParameterError("no calibration sample has a target; use longer texts")
            samples = np.concatenate([samples, acc / total])
            bar.update(k)
            stop = running_mean_converged(samples, tol) if tol > 0 else None
            if stop is not None and stop >= min_probes:
                samples = samples[:stop]
                break
            if rule.done(samples):
                break
    return samples, np.asarray([t.numel() for t in leaves])


def batched_products(probe_mode: str, device: str) -> bool:
    if probe_mode not in PROBE_MODES:
        raise InvalidParameterError(f"probe_mode must be one of {PROBE_MODES}, got {probe_mode!r}")
    return probe_mode == "vmap" or (probe_mode == "auto" and not device.startswith("cpu"))


def graphs(model: torch.nn.Module, ctx: EstimateContext, leaves: Sequence[torch.Tensor],
            cached: list[tuple[list[torch.Tensor | None], int]],
            cache: bool) -> Iterator[tuple[list[torch.Tensor | None], int]]:
    """First-order graphs per batch, built again each round unless cached (memory ∝ batches).
    A single batch is always cached: keeping it costs nothing extra."""
    if cached:
        yield from cached
        return
    keep = cache or len(ctx.batches) == 1
    for batch in ctx.batches:
        graph = first_order_graph(model, batch, ctx.model_kind, leaves)
        if keep:
            cached.append(graph)
        yield graph


def _products(grads: Sequence[torch.Tensor | None], leaves: Sequence[torch.Tensor],
              probes: Sequence[Sequence[torch.Tensor]],
              batched: bool) -> Iterator[tuple[int, list[torch.Tensor]]]:
    import torch

    if not batched:
        for p, z in enumerate(probes):
            yield p, hvp(grads, leaves, z)
        return
    stacked = [torch.stack([z[k] for z in probes]) for k in range(len(leaves))]
    res = hvp(grads, leaves, stacked, batched=True)
    for p in range(len(probes)):
        yield p, [r[p] for r in res]


