"""HAWQ-V2 trace score (``hessian-trace``), Hutchinson with a stopping rule.

Two curvatures (``HessianTraceEstimator(curvature=...)``):

* ``"gauss-newton"`` (default) — Tr(GN_i) of the Gauss–Newton form of the output distortion
  plans are judged by (:mod:`sensitivity._curvature`): ``Tr(GN_i) = E‖g_i‖²`` with
  ``g = Jᵀ v`` for sampled output cotangents (``E[v vᵀ] = H_D``). Per model kind: causal LM —
  token-mean KL(P_fp ‖ P_q) (y ~ P_fp per token, the true Fisher); classifier — per-example KL;
  encoder — 1 − cos of the pooled embedding. PSD, so a trace is never negative; no labels.
* ``"hessian"`` — Hutchinson on the Hessian of the task loss (:mod:`sensitivity._hessian`). That
  Hessian is indefinite away from a minimum (the encoder's InfoNCE; on BERT-base 41 of 73 traces
  came out negative): negative traces and traces within two standard errors of zero are listed
  in the table metadata (``negative_traces`` / ``noisy_traces`` with their SEM), a warning with
  the count is logged, and a negative trace gives cost 0 (predicts no harm, not a gain).

What one *probe* is. Both paths estimate the trace over the whole calibration set (S samples, T
counted output positions), and a probe is one i.i.d. unbiased draw of it for every unit at once:

* ``hessian``: one Rademacher vector z, ``t_{p,i} = z_iᵀ (H z)_i`` with H the Hessian of the mean
  loss over all calibration batches (one Hessian-vector product per batch);
* ``gauss-newton``: one *pass* over the calibration data with one fresh output cotangent per
  sample (one label per token for KL), ``t_{p,i} = (1/T) Σ_s ‖(J_sᵀ v_{s,p})_i‖²``.

A single (sample, cotangent) draw is not a probe: draws of different samples are not identically
distributed and the sample set is fixed, so their spread mixes the between-sample variance
(which no number of cotangents can shrink) into the error, and a rule on it need never stop.
Passes are i.i.d. given the data, so ``SEM = sd_p(t_p)/√m`` is the Monte-Carlo error of the
estimate and goes to 0 as probes are added. The rule (:class:`sensitivity._hessian.ProbeRule`):
probe until ``SEM_i ≤ rel_sem · |Tr_i|`` for every unit i (checked after each round once
``min_probes`` are in) or ``max_probes``; ``rel_sem = 0`` runs exactly ``max_probes``. All units
share the probes (each one serves every unit), so the stop is global; units still above the
target at the cap are named in a warning and in the metadata (``capped_units``).

Cost of the GN path: each round of ``probes`` passes shares one forward per ``chunk`` rows; each
(row, pass) gets its own backward (or one vmapped backward per forward, ``per_sample``). Pass p
draws its cotangents from its own generator seeded by (seed, p), so a seed gives the same probes
whatever ``probes``, ``chunk`` or ``per_sample``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.model.data.batches import batch_rows
from allocator.model.outputs import forward_outputs
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors, score_times_error
from sensitivity._curvature.output_metric import output_metric, row_cotangents
from sensitivity._curvature.reductions import unit_reduction
from sensitivity._curvature.sampling import VMAP_BELOW, check_per_sample, check_probes, pair_terms, row_chunks
from sensitivity._curvature.terms import gn_trace_terms
from sensitivity._hessian import (
    ProbeRule,
    batched_products,
    check_int,
    hutchinson_traces,
    trace_and_sem,
)
from sensitivity._loss import differentiable_attention, gradient_mode, unit_leaves
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

__all__ = [
    "CURVATURES",
    "NOISY_SEMS",
    "GNTraceProbes",
    "HessianTraceEstimator",
    "gn_trace_probes",
    "pass_seed",
    "trace_flags",
]

#: "gauss-newton": output-distortion GN trace (default); "hessian": task-loss Hutchinson trace.
CURVATURES = ("gauss-newton", "hessian")
#: A trace within this many standard errors of zero is flagged as noisy.
NOISY_SEMS = 2.0
#: Units named in the cap warning (all of them are in the metadata).
_NAMED = 10

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ GN probes (passes)
@dataclass(frozen=True, kw_only=True)
class GNTraceProbes:
    """Per-pass GN trace draws ``t_{p,i} = (1/T) Σ_s ‖(J_sᵀ v_{s,p})_i‖²``, (passes, units)."""

    samples: np.ndarray
    n_samples: int
    positions: int
    metric: str


def pass_seed(seed: int, p: int) -> int:
    """Seed of pass p's cotangent generator: independent streams per pass (SeedSequence), so a
    pass draws the same cotangents whatever the round it falls in."""
    return int(np.random.SeedSequence([seed % 2**64, p]).generate_state(1)[0])


def gn_trace_probes(model: torch.nn.Module, ctx: EstimateContext, rule: ProbeRule, *,
                    per_round: int = 2, chunk: int = 1,
                    per_sample: str = "auto") -> GNTraceProbes:
    """Passes over the calibration data until ``rule`` stops them (module doc).

    A round of ``per_round`` passes shares each chunk's forward; the (row, pass) backwards run on
    the retained graph (``loop``) or as one vmapped backward per forward (``vmap``; memory
    ``chunk × per_round ×`` the unit weights).
    """
    import torch

    check_per_sample(per_sample)
    metric = output_metric(ctx.model_kind)
    leaves, index = unit_leaves(model, ctx.units)
    n_weights = sum(t.numel() for t in leaves)
    batched = per_sample == "vmap" or (per_sample == "auto" and (
        not ctx.device.startswith("cpu") or n_weights < VMAP_BELOW))
    reduce = unit_reduction(ctx.units, index, lambda g, i: gn_trace_terms(g))
    samples = np.zeros((0, len(ctx.units)))
    n_samples = n_positions = 0
    with gradient_mode(model, leaves), progress_bar(rule.max_probes, "hessian-trace probes",
                                                     ctx.progress) as bar:
        while True:
            k = rule.round_size(samples.shape[0], per_round)
            gens = [torch.Generator().manual_seed(pass_seed(ctx.seed, samples.shape[0] + j))
                    for j in range(k)]
            sums: torch.Tensor | None = None
            n_samples = n_positions = 0
            for batch in ctx.batches:
                for sub in row_chunks(batch, chunk):
                    with differentiable_attention():
                        out = forward_outputs(model, sub, ctx.model_kind)
                    # one cotangent per row from each pass's own generator
                    draws = [row_cotangents(out, sub, ctx.model_kind, metric, 1, g) for g in gens]
                    counts = draws[0][1]
                    cots = [[d[0][r][0] for d in draws] for r in range(out.shape[0])]
                    terms = _pass_norms(out, leaves, cots, counts, reduce, batched)
                    if terms is not None:
                        sums = terms if sums is None else sums + terms
                    n_samples += sum(1 for c in counts if c > 0)
                    n_positions += sum(counts)
            if sums is None or n_positions == 0:
                raise InvalidParameterError("no calibration sample has an output position to "
                                            "compare; pass non-empty texts")
            # per-sample sums → the metric's per-position mean, as sampled_curvature does
            samples = np.concatenate([samples, sums.cpu().numpy() / n_positions])
            bar.update(k)
            if rule.done(samples):
                break
    return GNTraceProbes(samples=samples, n_samples=n_samples, positions=n_positions, metric=metric)


def _pass_norms(out: torch.Tensor, leaves: Sequence[torch.Tensor], cots: list[list[torch.Tensor]],
                counts: list[int], reduce: Any, batched: bool) -> torch.Tensor | None:
    """``Σ_row ‖(J_rowᵀ v_{row,p})_i‖²`` per pass p and unit i, (passes, units) float64; None when
    no row has a counted position."""
    import torch

    rows = [r for r in range(out.shape[0]) if counts[r] > 0]
    passes = len(cots[0]) if cots else 0
    pairs = [(r, p) for r in rows for p in range(passes)]
    if not pairs:
        return None
    acc: list[torch.Tensor | None] = [None] * passes
    for (_, p), term in zip(pairs, pair_terms(out, leaves, cots, pairs, reduce, batched), strict=True):
        prev = acc[p]
        acc[p] = term[:, 0] if prev is None else prev + term[:, 0]
    return torch.stack([a for a in acc if a is not None])


# ------------------------------------------------------------------ the estimator
def trace_flags(names: Sequence[str], trace: np.ndarray, sem: np.ndarray) -> dict[str, Any]:
    """Units whose trace estimate is negative, and those with ``|Tr| < NOISY_SEMS · SEM``
    (sign not resolved by the probes): ``{unit: {"trace": Tr, "sem": SEM}}`` each."""
    def entry(i: int) -> dict[str, float]:
        return {"trace": float(trace[i]), "sem": float(sem[i])}

    return {"negative_traces": {names[i]: entry(i) for i in range(len(names)) if trace[i] < 0},
            "noisy_traces": {names[i]: entry(i) for i in range(len(names))
                             if abs(trace[i]) < NOISY_SEMS * sem[i]}}


def stopping_info(names: Sequence[str], samples: np.ndarray, rule: ProbeRule) -> dict[str, Any]:
    """``probes`` used, per-unit ``converged`` and the ``capped_units`` (still above the target
    at ``max_probes``; a warning names them). Fixed mode (``rel_sem = 0``) has no target: empty."""
    m = int(samples.shape[0])
    info: dict[str, Any] = {"probes": m, "rel_sem": rule.rel_sem, "min_probes": rule.min_probes,
                            "max_probes": rule.max_probes, "converged": {}, "capped_units": []}
    if rule.fixed:
        return info
    ok = rule.converged(samples)
    capped = [n for n, c in zip(names, ok, strict=True) if not c]
    info["converged"] = {n: bool(c) for n, c in zip(names, ok, strict=True)}
    info["capped_units"] = capped
    if capped:
        shown = ", ".join(capped[:_NAMED]) + (f" (+{len(capped) - _NAMED} more)"
                                              if len(capped) > _NAMED else "")
        log.warning("hessian-trace: %d of %d units stopped at max_probes=%d with a standard error "
                    "above rel_sem=%g of |trace|: %s; raise max_probes or rel_sem (metadata "
                    "capped_units)", len(capped), len(names), m, rule.rel_sem, shown)
    return info


class HessianTraceEstimator(BaseEstimator):
    """HAWQ-V2 (arXiv 1911.03852): Ω_i(b) = Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖².

    Tr(H_i) ≈ t̄_i = (1/m) Σ_p t_{p,i} over m probes (module doc: a Rademacher probe of the
    task-loss Hessian, or a pass of output cotangents for the GN form), stopped once
    ``SEM_i = sd_p(t_{p,i})/√m ≤ rel_sem · |t̄_i|`` for every unit (after ``min_probes``) or at
    ``max_probes``. ``cost_std`` is that SEM times the same factor, SEM_i/n_i · ‖ΔW‖².

    Args:
        curvature: ``gauss-newton`` or ``hessian`` (see the module doc).
        rel_sem: target standard error as a fraction of |trace| (0.05); 0 = exactly
            ``max_probes`` probes (the fixed-count behaviour).
        min_probes: probes before the rule is checked (default min(8, max_probes); ≥ 2).
        max_probes: the probe cap (PyHessian: 100).
        probes, chunk, per_sample: GN only — passes per round (each row's forward serves
            ``probes`` output cotangents, one per pass), rows per forward,
            ``auto``/``loop``/``vmap`` per-(row, pass) backward.
        probes_per_round: ``hessian`` only — probes sharing one first-order graph per batch.
        probe_mode: ``hessian`` only — ``auto`` (vmap on GPU, loop on CPU), ``loop`` or ``vmap``.
        cache_graphs: ``hessian`` only — keep every batch's first-order graph across rounds
            (memory ∝ batches).
    """

    name: ClassVar[str] = "hessian-trace"

    def __init__(self, *, curvature: str = "gauss-newton", rel_sem: float = 0.05,
                 min_probes: int | None = None, max_probes: int = 100, probes: int = 2,
                 chunk: int = 1, per_sample: str = "auto", probes_per_round: int = 8,
                 probe_mode: str = "auto", cache_graphs: bool = False) -> None:
        if curvature not in CURVATURES:
            raise InvalidParameterError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.curvature = curvature
        # A default minimum above an explicit small cap would reject e.g. max_probes=2 (a quick
        # fixed run); an explicit min_probes above max_probes is still an error (ProbeRule).
        if min_probes is None and isinstance(max_probes, int) and not isinstance(max_probes, bool):
            min_probes = max(2, min(8, max_probes))
        rule = ProbeRule(rel_sem=rel_sem, min_probes=min_probes if min_probes is not None else 8,
                         max_probes=max_probes)
        self.rel_sem = rule.rel_sem
        self.min_probes = rule.min_probes
        self.max_probes = rule.max_probes
        self.probes = check_probes(probes)
        self.chunk = check_int("chunk", chunk, 1, "rows per forward")
        self.per_sample = check_per_sample(per_sample)
        self.probes_per_round = check_int("probes_per_round", probes_per_round, 1)
        batched_products(probe_mode, "cpu")  # validates the name
        self.probe_mode = probe_mode
        self.cache_graphs = bool(cache_graphs)

    @property
    def rule(self) -> ProbeRule:
        return ProbeRule(rel_sem=self.rel_sem, min_probes=self.min_probes,
                         max_probes=self.max_probes)

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        n = np.asarray([u.params for u in ctx.units], dtype=np.float64)
        names = [u.name for u in ctx.units]
        errors = quant_errors(model, ctx.units, ctx.options, ctx.quantizer)
        if self.curvature == "gauss-newton":
            est = gn_trace_probes(model, ctx, self.rule, per_round=self.probes, chunk=self.chunk,
                                  per_sample=self.per_sample)
            trace, sem = trace_and_sem(est.samples)
            return UnitCosts(cost=score_times_error(trace / n, errors),
                             cost_std=score_times_error(sem / n, errors),
                             info={"trace": trace.tolist(), "trace_sem": sem.tolist(),
                                   "curvature": self.curvature, "samples": est.n_samples,
                                   "positions": est.positions,
                                   "output_probes": int(est.samples.shape[0]),
                                   "output_metric": est.metric,
                                   **stopping_info(names, est.samples, self.rule)})
        samples, _ = hutchinson_traces(
            model, ctx, rel_sem=self.rel_sem, min_probes=self.min_probes,
            max_probes=self.max_probes, probes_per_round=self.probes_per_round,
            probe_mode=self.probe_mode, cache_graphs=self.cache_graphs)
        trace, sem = trace_and_sem(samples)
        flags = trace_flags(names, trace, sem)
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
            "trace": trace.tolist(), "trace_sem": sem.tolist(), "curvature": self.curvature,
            "samples": sum(batch_rows(b) for b in ctx.batches), **flags,
            **stopping_info(names, samples, self.rule)})

