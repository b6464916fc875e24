"""Second-order scores: HAWQ-V2 trace and HAWQ top eigenvalue.

``hessian-trace`` has two curvatures (``HessianTraceEstimator(curvature=...)``):

* ``"gauss-newton"`` (default) — Tr(GN_i) of the Gauss–Newton form of the output distortion
  plans are judged by (:mod:`sensitivity._gauss_newton`): ``Tr(GN_i) = E‖g_i‖²`` with
  ``g = Jᵀ v`` for sampled output cotangents (``E[v vᵀ] = H_D``). Per model kind: causal LM —
  token-mean KL(P_fp ‖ P_q) (y ~ P_fp per token, the true Fisher); classifier — per-example KL;
  encoder — 1 − cos of the pooled embedding. PSD, so a trace is never negative; no labels.
* ``"hessian"`` — Hutchinson on the Hessian of the task loss (below). That Hessian is
  indefinite away from a minimum (the encoder's InfoNCE; on BERT-base 41 of 73 traces came out
  negative): negative traces and traces within two standard errors of zero are listed in the
  table metadata (``negative_traces`` / ``noisy_traces`` with their SEM), a warning with the
  count is logged, and a negative trace gives cost 0 (predicts no harm, not a gain).

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
``benchmarks/sensitivity.py`` measures both against the one-probe-at-a-time loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors, score_times_error
from sensitivity._gauss_newton import (
    check_per_sample,
    check_probes,
    gn_trace_terms,
    sampled_curvature,
    unit_reduction,
)
from sensitivity._loss import gradient_mode, unit_block, unit_leaves
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

__all__ = [
    "CURVATURES",
    "HessianEigEstimator",
    "HessianTraceEstimator",
    "first_order_graph",
    "hutchinson_traces",
    "hvp",
    "power_iteration",
    "rademacher_probes",
    "running_mean_converged",
]

PROBE_MODES = ("auto", "loop", "vmap")
#: "gauss-newton": output-distortion GN trace (default); "hessian": task-loss Hutchinson trace.
CURVATURES = ("gauss-newton", "hessian")
#: A trace within this many standard errors of zero is flagged as noisy.
NOISY_SEMS = 2.0

log = logging.getLogger(__name__)


def first_order_graph(model: torch.nn.Module, batch: Any, kind: str,
                      leaves: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], int]:
    """``g = ∂L_b/∂W`` with its graph kept (for double backprop) and the batch's sample count.

    Leaves the loss does not reach (e.g. a pooler an encoder loss does not use) get ``None``:
    their Hessian block is zero.
    """
    import torch

    from sensitivity._loss import differentiable_attention, per_sample_losses

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


def _unit_quadratics(units: Sequence[Any], index: Sequence[int], z: Sequence[torch.Tensor],
                     hz: Sequence[torch.Tensor]) -> np.ndarray:
    """``z_iᵀ (H z)_i`` per unit: an unbiased estimate of Tr(H_i) (cross terms have mean 0)."""
    return np.array([float((unit_block(z[k], u) * unit_block(hz[k], u)).sum())
                     for u, k in zip(units, index, strict=True)])


def hutchinson_traces(
    model: torch.nn.Module, ctx: EstimateContext, *, tol: float = 1e-3, max_probes: int = 100,
    min_probes: int = 2, probes_per_round: int = 8, probe_mode: str = "auto",
    cache_graphs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Tr(H_i) samples per probe, (probes, units): HAWQ-V2's Hutchinson estimator.

    ``Tr(H_i) ≈ (1/m) Σ_p z_pᵢᵀ (H z_p)_i`` with z_p Rademacher over all unit weights. The loop
    stops at the first probe count where :func:`running_mean_converged` holds (so the result
    does not depend on ``probes_per_round``) or at ``max_probes``.
    """
    import torch

    leaves, index = unit_leaves(model, ctx.units)
    batched = _batched(probe_mode, ctx.device)
    gen = torch.Generator().manual_seed(ctx.seed)
    samples: list[np.ndarray] = []
    cached: list[tuple[list[torch.Tensor | None], int]] = []
    with gradient_mode(model, leaves), progress_bar(max_probes, "hessian-trace probes",
                                                     ctx.progress) as bar:
        while len(samples) < max_probes:
            k = min(probes_per_round, max_probes - len(samples))
            probes = rademacher_probes(leaves, k, gen)
            acc = np.zeros((k, len(ctx.units)))
            total = 0
            for grads, n in _graphs(model, ctx, leaves, cached, cache_graphs):
                total += n
                for p, hz in _products(grads, leaves, probes, batched):
                    acc[p] += n * _unit_quadratics(ctx.units, index, probes[p], hz)
            if total == 0:
                raise InvalidParameterError("no calibration sample has a target; use longer texts")
            samples.extend(acc / total)
            bar.update(k)
            stop = running_mean_converged(np.asarray(samples), tol)
            if stop is not None and stop >= min_probes:
                samples = samples[:stop]
                break
    return np.asarray(samples), np.asarray([t.numel() for t in leaves])


def _batched(probe_mode: str, device: str) -> bool:
    if probe_mode not in PROBE_MODES:
        raise InvalidParameterError(f"probe_mode must be one of {PROBE_MODES}, got {probe_mode!r}")
    return probe_mode == "vmap" or (probe_mode == "auto" and not device.startswith("cpu"))


def _graphs(model: torch.nn.Module, ctx: EstimateContext, leaves: Sequence[torch.Tensor],
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


def power_iteration(
    model: torch.nn.Module, ctx: EstimateContext, *, max_iter: int = 20, tol: float = 1e-3,
    cache_graphs: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Dominant eigenvalue λ_i of every unit block H_i, and the iterations used (HAWQ).

    ``v ← H_i v / ‖H_i v‖`` from a seeded Gaussian start; ``λ = vᵀ H_i v`` with ‖v‖ = 1; a unit
    stops when ``|λ_t − λ_{t−1}| / (|λ_{t−1}| + 1e-6) < tol`` (PyHessian) or after ``max_iter``.
    Each unit needs its own products (a shared probe would mix in the cross blocks H_ij).
    """
    import torch

    leaves, index = unit_leaves(model, ctx.units)
    gen = torch.Generator().manual_seed(ctx.seed)
    vecs: list[torch.Tensor] = []
    for u, k in zip(ctx.units, index, strict=True):
        v = torch.randn(tuple(unit_block(leaves[k].detach(), u).shape), generator=gen)
        vecs.append((v / v.norm()).to(leaves[k].device, leaves[k].dtype))
    lam = np.zeros(len(ctx.units))
    iters = np.zeros(len(ctx.units), dtype=np.int64)
    active = list(range(len(ctx.units)))
    cached: list[tuple[list[torch.Tensor | None], int]] = []
    with gradient_mode(model, leaves), progress_bar(max_iter, "hessian-eig iterations",
                                                     ctx.progress) as bar:
        for _ in range(max_iter):
            hv = [torch.zeros_like(vecs[i]) for i in active]
            total = 0
            for grads, n in _graphs(model, ctx, leaves, cached, cache_graphs):
                total += n
                for a, i in enumerate(active):
                    hv[a] += n * _block_hvp(grads, leaves, ctx.units[i], index[i], vecs[i])
            if total == 0:
                raise InvalidParameterError("no calibration sample has a target; use longer texts")
            still = []
            for a, i in enumerate(active):
                h = hv[a] / total
                new = float((vecs[i] * h).sum())
                iters[i] += 1
                norm = float(h.norm())
                if norm > 0:
                    vecs[i] = h / norm
                done = iters[i] > 1 and abs(new - lam[i]) / (abs(lam[i]) + 1e-6) < tol
                lam[i] = new
                if not done and norm > 0:
                    still.append(i)
            active = still
            bar.update(1)
            if not active:
                break
    return lam, iters


def _block_hvp(grads: Sequence[torch.Tensor | None], leaves: Sequence[torch.Tensor], unit: Any,
               k: int, v: torch.Tensor) -> torch.Tensor:
    """``H_i v`` for one unit: probe zero outside the unit's block, result cut to the block."""
    import torch

    g = grads[k]
    if g is None:
        return torch.zeros_like(v)
    full = torch.zeros_like(leaves[k])
    unit_block(full, unit).copy_(v)
    (res,) = torch.autograd.grad([g], [leaves[k]], grad_outputs=[full], retain_graph=True,
                                 allow_unused=True)
    return torch.zeros_like(v) if res is None else unit_block(res.detach(), unit).clone()


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(f"{name} must be an int ≥ {low}, got {value!r}")
    return value


def _check_tol(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value >= 0):
        raise InvalidParameterError(f"tol must be a finite number ≥ 0, got {value!r}")
    return float(value)


class HessianTraceEstimator(BaseEstimator):
    """HAWQ-V2 (arXiv 1911.03852): Ω_i(b) = Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖².

    With ``curvature="gauss-newton"`` (default) H_i is the output-distortion GN block and
    Tr(GN_i) = E‖g_i‖² is sampled with ``probes`` output cotangents per calibration sample;
    with ``"hessian"`` Tr(H_i) of the task loss comes from Hutchinson with Rademacher probes
    (:func:`hutchinson_traces`). ``cost_std`` is the standard error of the trace times the same
    factor.

    Args:
        curvature: ``gauss-newton`` or ``hessian`` (see the module doc).
        probes, chunk, per_sample: GN only — output probes per sample, rows per forward,
            ``auto``/``loop``/``vmap`` per-(sample, probe) backward.
        tol: relative change of the running mean that stops the probes (PyHessian: 1e-3).
        max_probes: at most this many probes (PyHessian: 100).
        min_probes: at least this many (≥ 2, for a standard error).
        probes_per_round: probes sharing one first-order graph per batch.
        probe_mode: ``auto`` (vmap on GPU, loop on CPU), ``loop`` or ``vmap``.
        cache_graphs: keep every batch's first-order graph across rounds (memory ∝ batches).
        (tol … cache_graphs: ``hessian`` only.)
    """

    name: ClassVar[str] = "hessian-trace"

    def __init__(self, *, curvature: str = "gauss-newton", probes: int = 2, chunk: int = 1,
                 per_sample: str = "auto", tol: float = 1e-3, max_probes: int = 100,
                 min_probes: int = 2, probes_per_round: int = 8, probe_mode: str = "auto",
                 cache_graphs: bool = False) -> None:
        if curvature not in CURVATURES:
            raise InvalidParameterError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.curvature = curvature
        self.probes = check_probes(probes)
        self.chunk = _check_int("chunk", chunk, 1)
        self.per_sample = check_per_sample(per_sample)
        self.tol = _check_tol(tol)
        self.max_probes = _check_int("max_probes", max_probes, 2)
        self.min_probes = _check_int("min_probes", min_probes, 2)
        if self.min_probes > self.max_probes:
            raise InvalidParameterError(f"min_probes ({min_probes}) must be ≤ max_probes ({max_probes})")
        self.probes_per_round = _check_int("probes_per_round", probes_per_round, 1)
        _batched(probe_mode, "cpu")
        self.probe_mode = probe_mode
        self.cache_graphs = bool(cache_graphs)

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        n = np.asarray([u.params for u in ctx.units], dtype=np.float64)
        errors = quant_errors(model, ctx.units, ctx.options)
        if self.curvature == "gauss-newton":
            _, index = unit_leaves(model, ctx.units)
            reduce = unit_reduction(ctx.units, index, lambda g, i: gn_trace_terms(g))
            est = sampled_curvature(model, ctx, reduce, probes=self.probes, chunk=self.chunk,
                                    per_sample=self.per_sample, label="hessian-trace")
            trace, sem = est.mean[:, 0], est.sem[:, 0]
            return UnitCosts(cost=score_times_error(trace / n, errors),
                             cost_std=score_times_error(sem / n, errors),
                             info={"trace": trace.tolist(), "trace_sem": sem.tolist(),
                                   "curvature": self.curvature, **est.info()})
        samples, _ = hutchinson_traces(
            model, ctx, tol=self.tol, max_probes=self.max_probes, min_probes=self.min_probes,
            probes_per_round=self.probes_per_round, probe_mode=self.probe_mode,
            cache_graphs=self.cache_graphs)
        trace = samples.mean(axis=0)
        sem = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
        flags = trace_flags([u.name for u in ctx.units], trace, sem)
        if flags["negative_traces"] or flags["noisy_traces"]:
            log.warning("hessian-trace: %d of %d task-loss Hessian traces are negative (cost set "
                        "to 0) and %d are within %g standard errors of 0; see the table metadata "
                        "or use curvature='gauss-newton'", len(flags["negative_traces"]),
                        len(trace), len(flags["noisy_traces"]), NOISY_SEMS)
        # A negative trace estimate (saddle directions or noise) predicts no harm, not a gain;
        # the clipped units are recorded in the metadata (negative_traces).
        cost = score_times_error(np.maximum(trace, 0.0) / n, errors)
        std = score_times_error(sem / n, errors)
        return UnitCosts(cost=cost, cost_std=std, info={
            "trace": trace.tolist(), "trace_sem": sem.tolist(), "probes": int(samples.shape[0]),
            "curvature": self.curvature, **flags})


def trace_flags(names: Sequence[str], trace: np.ndarray, sem: np.ndarray) -> dict[str, Any]:
    """Units whose trace estimate is negative, and those with ``|Tr| < NOISY_SEMS · SEM``
    (sign not resolved by the probes): ``{unit: {"trace": Tr, "sem": SEM}}`` each."""
    def entry(i: int) -> dict[str, float]:
        return {"trace": float(trace[i]), "sem": float(sem[i])}

    return {"negative_traces": {names[i]: entry(i) for i in range(len(names)) if trace[i] < 0},
            "noisy_traces": {names[i]: entry(i) for i in range(len(names))
                             if abs(trace[i]) < NOISY_SEMS * sem[i]}}


class HessianEigEstimator(BaseEstimator):
    """HAWQ (arXiv 1905.03696): cost(i, b) = |λ_i|/n_i · ‖Q_b(W_i) − W_i‖².

    λ_i is the dominant eigenvalue of H_i by power iteration on Hessian-vector products
    (:func:`power_iteration`); HAWQ orders blocks by λ_i/n_i.

    Args:
        max_iter: power iterations per unit (HAWQ: ~20).
        tol: relative change of λ that stops a unit early.
        cache_graphs: keep every batch's first-order graph across iterations (default: the
            graphs are reused by all units × iterations, so rebuilding them would dominate).
    """

    name: ClassVar[str] = "hessian-eig"

    def __init__(self, *, max_iter: int = 20, tol: float = 1e-3, cache_graphs: bool = True) -> None:
        self.max_iter = _check_int("max_iter", max_iter, 1)
        self.tol = _check_tol(tol)
        self.cache_graphs = bool(cache_graphs)

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        lam, iters = power_iteration(model, ctx, max_iter=self.max_iter, tol=self.tol,
                                     cache_graphs=self.cache_graphs)
        n = np.asarray([u.params for u in ctx.units], dtype=np.float64)
        cost = score_times_error(np.abs(lam) / n, quant_errors(model, ctx.units, ctx.options))
        return UnitCosts(cost=cost, info={"eigenvalue": lam.tolist(), "iterations": iters.tolist()})

