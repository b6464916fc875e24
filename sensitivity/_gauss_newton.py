"""Output-consistent curvature: the Gauss–Newton form of the distortion plans are judged by.

A plan is judged by an output distortion ``D(f_W(x), f_{W+δ}(x))`` against the full-precision
model (:mod:`allocator.backend._evaluate`). At δ = 0 the distortion and its gradient vanish, and
its second-order term is the Gauss–Newton (GN) quadratic form

    D ≈ ½ δᵀ GN δ,   GN = (1/T) Σ_p J_pᵀ H_D,p J_p,

over the T counted output positions p (J_p = ∂f_p/∂W, H_D,p the Hessian of the metric in the
output at the reference). GN is positive semi-definite, and it needs no labels: an output
cotangent ``v`` with ``E[v vᵀ] = H_D`` turns one backward into a sample ``g = Jᵀ v = ∇_W(vᵀ f)``
with ``E[g gᵀ] = Jᵀ H_D J``.

Per model kind (the metric of the evaluator; the output is :func:`forward_outputs`, i.e. exactly
the tensor the evaluator compares):

* ``causal_lm`` — token-mean ``KL(P_fp ‖ P_q)`` over the attention-mask positions. Per position
  ``H_D = diag(p) − p pᵀ`` (softmax Fisher); ``v = p − onehot(y)``, ``y ~ P_fp`` (the *true*
  Fisher: labels sampled from the model, not the data). One draw per token and one backward per
  sequence stay unbiased: the cross terms between tokens have mean zero.
* ``classifier`` (and ``generic``: the evaluator compares their outputs by KL as well) — the same
  per example (per position for [B, T, C] logits, all positions counted). Batches may hold
  ``pixel_values`` instead of ``input_ids``.
* ``encoder`` — ``1 − cos(e_fp, e_q)`` of the mean-pooled, L2-normalised embedding.
  ``H_D = (I − ê êᵀ)/‖e‖²`` (:func:`cosine_output_hessian`), ``v = (I − ê êᵀ) z / ‖e‖`` with
  ``z ~ N(0, I)``.

Every estimate is ``(1/T) Σ_s mean_k r(g_{s,k})`` over samples s and probes k, with a per-sample
reduction r (squared inner product, diagonal, or squared norm); the per-sample probe means are
accumulated as running sums, so no gradient outlives its reduction. ``cost_std`` is the standard
error over samples (the probes of one sample are averaged first: they share the sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.units import unit_weight
from allocator.model.kind import ModelKind
from sensitivity._base import EstimateContext, SampleMeanEstimator, UnitCosts
from sensitivity._deltas import DEFAULT_DELTA_BUDGET_MB, check_delta_budget, delta_bytes, delta_groups
from sensitivity._loss import differentiable_attention, gradient_mode, unit_block, unit_leaves
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

__all__ = [
    "PER_SAMPLE_MODES",
    "GaussNewtonEstimator",
    "SampledCurvature",
    "SplitTerm",
    "UnitReduction",
    "check_chunk",
    "check_per_sample",
    "check_probes",
    "curvature_in_passes",
    "cosine_cotangent",
    "cosine_output_hessian",
    "gn_diagonal_terms",
    "gn_inner_products",
    "gn_quadratic_terms",
    "gn_square",
    "gn_trace_terms",
    "kl_cotangent",
    "output_metric",
    "pair_curvature",
    "pair_stream",
    "pair_terms",
    "quant_deltas",
    "row_pieces",
    "sampled_curvature",
    "softmax_fisher",
    "streamed_reduce",
    "unit_reduction",
]

PER_SAMPLE_MODES = ("auto", "loop", "vmap")
#: Below this many unit weights, "auto" vmaps the per-(sample, probe) backward on CPU.
_VMAP_BELOW = 2_000_000

#: (grads of one (sample, probe), one tensor per leaf) → (units, width) float64 terms.
Reduction = Callable[[Sequence["torch.Tensor"]], "torch.Tensor"]


# ------------------------------------------------------------------ output metric Hessians
def softmax_fisher(p: torch.Tensor) -> torch.Tensor:
    """``H_KL = diag(p) − p pᵀ``: Hessian in the logits l of ``KL(p ‖ softmax(l))`` at
    ``softmax(l) = p`` (over the last dim; returns [..., C, C])."""
    import torch

    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def cosine_output_hessian(e: torch.Tensor) -> torch.Tensor:
    """``H_cos = (I − ê êᵀ)/‖e‖²``: Hessian in x of ``1 − cos(e, x)`` at x = e.

    With e = r ê, a = ê·δ/r and b = ‖δ‖²/r², cos(e, e + δ) = (1 + a)/√(1 + 2a + b)
    = 1 − b/2 + a²/2 + O(δ³), so 1 − cos = ½ (‖δ‖² − (ê·δ)²)/r² = ½ δᵀ H_cos δ.
    """
    import torch

    r2 = (e * e).sum(-1, keepdim=True).unsqueeze(-1)
    e_hat = torch.nn.functional.normalize(e, dim=-1)
    eye = torch.eye(e.shape[-1], dtype=e.dtype, device=e.device)
    return (eye - e_hat.unsqueeze(-1) * e_hat.unsqueeze(-2)) / r2


def kl_cotangent(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``v = ∇_l(−log p_y) = p − onehot(y)`` with ``y = F_p⁻¹(u)`` (u ~ U(0, 1) per position, so
    y ~ p): ``E[v vᵀ] = diag(p) − p pᵀ`` (:func:`softmax_fisher`). Shape of ``logits``."""
    import torch

    p = torch.softmax(logits.detach().double(), dim=-1)
    cdf = torch.cumsum(p, dim=-1)
    y = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1).contiguous())
    y = y.clamp_max(p.shape[-1] - 1)
    return p - torch.zeros_like(p).scatter_(-1, y, 1.0)


def cosine_cotangent(e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``v = (I − ê êᵀ) z / ‖e‖`` with z ~ N(0, I): ``E[v vᵀ] = (I − ê êᵀ)/‖e‖²``
    (:func:`cosine_output_hessian`; the projector is idempotent)."""

    e = e.detach().double()
    r = e.norm(dim=-1, keepdim=True)
    e_hat = e / r.clamp_min(1e-30)
    z = z.double()
    return (z - e_hat * (e_hat * z).sum(-1, keepdim=True)) / r.clamp_min(1e-30)


def output_metric(kind: str) -> str:
    """The evaluator's metric per model kind: ``cos`` for encoders, ``kl`` for the rest."""
    return "cos" if kind == "encoder" else "kl"


# ------------------------------------------------------------------ per-(sample, probe) terms
def gn_quadratic_terms(g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``½ ⟨ΔW_o, g⟩²`` per option o: ``g`` [out, cols], ``delta`` [options, out, cols].

    With ``g = Jᵀ v`` and ``E[v vᵀ] = H_D``, ``E ½ ⟨ΔW, g⟩² = ½ ΔWᵀ Jᵀ H_D J ΔW`` (the exact GN
    form of the unit block, within-unit correlations included)."""
    return gn_square(gn_inner_products(g, delta))


def gn_inner_products(g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``⟨ΔW_o, g⟩`` per option o (float64): linear in the weights, so a unit's value is the sum
    over any split of its rows — what :func:`curvature_in_passes` uses for a unit whose deltas
    alone exceed the budget."""
    return (delta.reshape(delta.shape[0], -1) @ g.to(delta.dtype).reshape(-1)).double()  # gemv


def gn_square(inner: torch.Tensor) -> torch.Tensor:
    """``½ x²``: :func:`gn_quadratic_terms` from its summed :func:`gn_inner_products`."""
    return 0.5 * inner**2


def gn_diagonal_terms(g: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
    """``½ Σ_j g_j² ΔW_{o,j}²`` per option o: ``E[g_j²] = GN_jj`` (true-Fisher diagonal)."""
    g2 = g.to(delta_sq.dtype).reshape(-1) ** 2
    return 0.5 * (delta_sq.reshape(delta_sq.shape[0], -1) @ g2).double()


def gn_trace_terms(g: torch.Tensor) -> torch.Tensor:
    """``‖g_u‖²`` (shape [1]): ``E‖g_u‖² = Tr(Jᵀ H_D J)_u = Tr(GN_u)``, never negative.

    Summed over blocks of rows: a float64 copy of a whole 32000 × 2048 head gradient and its
    square are 1 GB."""
    import torch

    flat = g.reshape(g.shape[0], -1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, flat.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for i in range(0, flat.shape[0], rows):
        total += flat[i:i + rows].double().square_().sum()
    return total.reshape(1)


#: float64 elements per block of rows in :func:`gn_trace_terms` (32 MiB)
_BLOCK_ELEMENTS = 1 << 22


def quant_deltas(model: torch.nn.Module, ctx: EstimateContext, *,
                 squared: bool = False) -> list[torch.Tensor]:
    """``ΔW = Q_o(W) − W`` (or ``ΔW²``) per unit stacked over options, float32 [options, out,
    cols] (shared RTN quantizer :func:`allocator.model.quant.fake_quantize`), on the weight's
    device. 4 bytes × options per weight: callers hold them under a budget
    (:mod:`sensitivity._deltas`)."""
    return [_deltas_of(unit_weight(model, unit), ctx.options, squared=squared) for unit in ctx.units]


def _deltas_of(weight: torch.Tensor, options: Sequence[Any], *, squared: bool) -> torch.Tensor:
    """``Q_o(W) − W`` (or its square) of a 2-D weight view, float32 [options, out, cols]."""
    import torch

    from allocator.model.quant import fake_quantize

    with torch.no_grad():
        w = weight.detach().float()
        # filled in place: a list of options then torch.stack would hold the deltas twice
        d = torch.empty((len(options), *w.shape), dtype=torch.float32, device=w.device)
        for o, fmt in enumerate(options):
            d[o] = fake_quantize(w, fmt)
            d[o] -= w
        return d.square_() if squared else d


# ------------------------------------------------------------------ the sampling engine
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
    """Stream ``r(g_{s,k})`` over every calibration sample s and output probe k (module doc).

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
    return _curvature(s1, s2, n_samples, n_positions, probes, output_metric(ctx.model_kind))


def pair_stream(model: torch.nn.Module, ctx: EstimateContext, reduce: Reduction, *, probes: int,
                chunk: int, per_sample: str, label: str) -> Iterator[tuple[int, torch.Tensor]]:
    """Per calibration row with a counted output position, in data order: (its positions,
    ``r(g_{row,k})`` stacked over the probes k). The engine of :func:`sampled_curvature`."""
    from allocator.model.outputs import forward_outputs

    if per_sample not in PER_SAMPLE_MODES:
        raise InvalidParameterError(f"per_sample must be one of {PER_SAMPLE_MODES}, got {per_sample!r}")
    metric = output_metric(ctx.model_kind)
    leaves, _ = unit_leaves(model, ctx.units)
    n_weights = sum(t.numel() for t in leaves)
    batched = per_sample == "vmap" or (per_sample == "auto" and (
        not ctx.device.startswith("cpu") or n_weights < _VMAP_BELOW))
    with gradient_mode(model, leaves), progress_bar(len(ctx.batches), f"{label} batches",
                                                     ctx.progress) as bar:
        for b, batch in enumerate(ctx.batches):
            gen = ctx.batch_generator(b)  # per batch: a shard of the batches draws the same
            for sub in _row_chunks(batch, chunk):
                with differentiable_attention():
                    out = forward_outputs(model, sub, ctx.model_kind)
                cots, counts = _cotangents(out, sub, ctx.model_kind, metric, probes, gen)
                yield from _row_terms(out, leaves, cots, counts, probes, reduce, batched)
            bar.update(1)


def _curvature(s1: torch.Tensor | None, s2: torch.Tensor | None, n_samples: int, n_positions: int,
               probes: int, metric: str) -> SampledCurvature:
    """Mean and standard error over samples from the per-sample sums S₁, S₂ (module doc)."""
    if s1 is None or s2 is None or n_positions == 0:
        raise InvalidParameterError("no calibration sample has an output position to compare; "
                                    "pass non-empty texts")
    mean_s = (s1 / n_samples).cpu().numpy()
    var_s = ((s2 / n_samples).cpu().numpy() - mean_s**2) * n_samples / max(n_samples - 1, 1)
    scale = n_samples / n_positions  # per-sample sums → the metric's per-position mean
    sem = scale * np.sqrt(np.maximum(var_s, 0.0) / n_samples) if n_samples > 1 else 0 * mean_s
    return SampledCurvature(mean=scale * mean_s, sem=sem, samples=n_samples,
                            positions=n_positions, probes=probes, metric=metric)


def _row_chunks(batch: Mapping[str, Any], chunk: int) -> list[dict[str, Any]]:
    """Sub-batches of ``chunk`` rows (tensors with the batch's leading size are sliced)."""
    import torch

    from sensitivity._loss import sample_count

    rows = sample_count(batch)
    out = []
    for lo in range(0, rows, chunk):
        hi = min(lo + chunk, rows)
        out.append({k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows
                    else v for k, v in batch.items()})
    return out


def _cotangents(out: torch.Tensor, batch: Mapping[str, Any], kind: str, metric: str, probes: int,
                gen: torch.Generator) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Per row: ``probes`` output cotangents (shaped like ``out[row]``) and its counted positions.

    KL counts the attention-mask positions for causal LMs (as the evaluator) and every position
    otherwise; cos counts one per row."""
    import torch

    mask = None
    if metric == "kl" and kind == ModelKind.CAUSAL_LM and out.dim() == 3:
        am = batch.get("attention_mask")
        if isinstance(am, torch.Tensor) and tuple(am.shape) == tuple(out.shape[:2]):
            mask = am.to(out.device).bool()
    cots: list[list[torch.Tensor]] = []
    counts: list[int] = []
    for row in range(out.shape[0]):
        o = out[row].detach()
        per_row = []
        for _ in range(probes):
            if metric == "kl":
                u = torch.rand(tuple(o.shape[:-1]), generator=gen, dtype=torch.float64)
                v = kl_cotangent(o, u.to(o.device))
                if mask is not None:
                    v = v * mask[row].unsqueeze(-1)
            else:
                z = torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64)
                v = cosine_cotangent(o, z.to(o.device))
            per_row.append(v.to(out.dtype))
        cots.append(per_row)
        if metric == "cos":
            counts.append(1)
        elif mask is not None:
            counts.append(int(mask[row].sum()))
        else:
            counts.append(int(math.prod(o.shape[:-1])))
    return cots, counts


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


@dataclass(frozen=True)
class UnitReduction:
    """(gradients of one (sample, probe), one tensor per leaf) → (units, width) float64:
    ``term(unit block of g, unit position)`` stacked over units. It also reduces one leaf on its
    own (:meth:`of_leaf`), which lets :func:`streamed_reduce` drop each weight's gradient as soon
    as autograd has accumulated it."""

    units: Sequence[Any]
    index: Sequence[int]
    term: Callable[[torch.Tensor, int], torch.Tensor]

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack([self.term(unit_block(grads[k], u), i)
                            for i, (u, k) in enumerate(zip(self.units, self.index, strict=True))])

    def of_leaf(self, leaf: int, grad: torch.Tensor) -> dict[int, torch.Tensor]:
        """The terms of the units whose weight is leaf ``leaf`` (column groups share one)."""
        return {i: self.term(unit_block(grad, u), i)
                for i, (u, k) in enumerate(zip(self.units, self.index, strict=True)) if k == leaf}


def unit_reduction(units: Sequence[Any], index: Sequence[int],
                   term: Callable[[torch.Tensor, int], torch.Tensor]) -> UnitReduction:
    """Stack ``term(unit block of g, unit position)`` over units: (units, width) float64."""
    return UnitReduction(units, index, term)


def streamed_reduce(out: torch.Tensor, leaves: Sequence[torch.Tensor], cot: torch.Tensor,
                    reduce: UnitReduction) -> torch.Tensor:
    """``reduce(Jᵀ cot)`` with every weight's gradient reduced the moment autograd has accumulated
    it and then dropped: one weight's gradient is alive at a time, not all of them (the whole
    model's size when every Linear is a unit, as for ``hessian-trace`` on a 1B model). The same
    values as ``torch.autograd.grad`` then ``reduce``; a leaf the output does not reach counts
    as a zero gradient, as ``allow_unused`` does there."""
    import torch

    terms: dict[int, torch.Tensor] = {}

    def hook_for(k: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                terms.update(reduce.of_leaf(k, p.grad.detach()))
            p.grad = None
        return hook

    kept = [t.grad for t in leaves]  # a caller's gradients survive the estimate
    for t in leaves:
        t.grad = None
    handles = [t.register_post_accumulate_grad_hook(hook_for(k)) for k, t in enumerate(leaves)]
    try:
        torch.autograd.backward(out, grad_tensors=cot, retain_graph=True, inputs=list(leaves))
    finally:
        for h in handles:
            h.remove()
        for t, g in zip(leaves, kept, strict=True):
            t.grad = g
    for k, t in enumerate(leaves):
        missing = [i for i, kk in enumerate(reduce.index) if kk == k and i not in terms]
        if missing:
            terms.update(reduce.of_leaf(k, torch.zeros_like(t)))
    return torch.stack([terms[i] for i in range(len(reduce.units))])


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


class GaussNewtonEstimator(SampleMeanEstimator):
    """Sampled Gauss–Newton form of the output distortion (module doc):

        cost(u, o) = ½ mean_{s,k} ⟨ΔW_{u,o}, g_{s,k,u}⟩²  →  ½ ΔWᵀ GN_u ΔW  (unbiased),

    ``g_{s,k} = Jᵀ v_{s,k}`` with sampled output cotangents (``E[v vᵀ] = H_D``), weighted so the
    cost predicts the evaluator's per-position mean distortion (token-mean KL for causal LMs,
    per-example KL for classifiers, mean 1 − cos for encoders). Unlike diagonal or trace scores
    it keeps the within-unit correlations of GN; it is never negative.
    A sample mean over the calibration batches, so it shards by batch
    (:class:`~sensitivity._base.SampleMeanEstimator`).

    Memory: the float32 deltas of all units and options (4 bytes × options per weight) are held
    at most ``delta_budget_mb`` at a time: beyond it the units are split into groups, one pass
    over the data each, with the same table (:mod:`sensitivity._deltas`).

    Args:
        probes: output cotangents per sample (1–4 is enough: the samples already average).
        chunk: rows per forward pass (each (row, probe) gets its own backward).
        per_sample: ``auto`` (vmap on GPU and for small models), ``loop`` or ``vmap``.
        delta_budget_mb: MiB of deltas held per pass (more passes when exceeded).
    """

    name: ClassVar[str] = "gauss-newton"

    def __init__(self, *, probes: int = 2, chunk: int = 1, per_sample: str = "auto",
                 delta_budget_mb: float = DEFAULT_DELTA_BUDGET_MB) -> None:
        self.probes = check_probes(probes)
        self.chunk = check_chunk(chunk)
        self.per_sample = check_per_sample(per_sample)
        check_delta_budget(delta_budget_mb)
        self.delta_budget_mb = delta_budget_mb

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        return curvature_in_passes(model, ctx, gn_quadratic_terms, squared=False,
                                   budget_bytes=check_delta_budget(self.delta_budget_mb),
                                   probes=self.probes, chunk=self.chunk, per_sample=self.per_sample,
                                   label="gauss-newton",
                                   split=SplitTerm(linear=gn_inner_products, finish=gn_square))


@dataclass(frozen=True, kw_only=True)
class SplitTerm:
    """A per-(sample, probe) term written as ``finish(Σ_pieces linear(g_piece, ΔW_piece))`` over
    any split of a unit's output rows (RTN groups, channels and k-quant blocks lie along a row,
    so a row range quantizes exactly as inside the whole weight)."""

    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]


def row_pieces(unit: Any, options: Sequence[Any], budget_bytes: int) -> list[tuple[int, int]]:
    """The fewest balanced output-row ranges ``[lo, hi)`` of ``unit`` whose deltas each fit
    (a single row over the budget is a piece of its own)."""
    rows = int(unit.shape[0])
    per_row = delta_bytes(unit, options) / rows
    k = math.ceil(rows / max(1, int(budget_bytes // per_row)))
    size, extra = divmod(rows, k)  # the first `extra` pieces get one more row
    bounds = np.cumsum([0] + [size + (j < extra) for j in range(k)])
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def curvature_in_passes(model: torch.nn.Module, ctx: EstimateContext,
                        term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, squared: bool,
                        budget_bytes: int, probes: int, chunk: int, per_sample: str,
                        label: str, split: SplitTerm | None = None) -> UnitCosts:
    """:func:`sampled_curvature` of ``term(g_u, deltas_u)`` (``ΔW²`` with ``squared``) over
    groups of units whose deltas fit ``budget_bytes``
    (:func:`~sensitivity._deltas.delta_groups`), one pass over the data per group.

    With ``split``, a unit whose deltas alone exceed the budget (a 32000-row LM head at 1B, the
    MLP matrices of larger models) is measured in :func:`row_pieces`, one pass each: the passes
    draw the same cotangents, so summing the pieces' linear parts per (sample, probe) before
    ``finish`` gives that unit's ``term`` exactly. Without it such a unit gets a pass of its own
    holding all its deltas."""
    import dataclasses

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
    return UnitCosts(cost=mean, cost_std=sem, info={**info, "passes": n_passes})


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
        delta = _deltas_of(unit_weight(model, unit)[lo:hi], ctx.options, squared=squared)
        reduce = _piece_reduction(unit, index[0], lo, hi, split.linear, delta)
        stream = list(pair_stream(model, ctx, reduce, probes=probes, chunk=chunk,
                                  per_sample=per_sample, label=label))
        part = torch.stack([t for _, t in stream])  # [samples, probes, 1, options]
        counts = [c for c, _ in stream]
        total = part if total is None else total + part
        del delta, reduce
    if total is None or not counts:
        return _curvature(None, None, 0, 0, probes, output_metric(ctx.model_kind))
    return pair_curvature(split.finish(total), counts, output_metric(ctx.model_kind))


def pair_curvature(terms: torch.Tensor, counts: Sequence[int], metric: str) -> SampledCurvature:
    """:func:`sampled_curvature`'s reduction of terms kept per pair, ``[samples, probes, ...]``
    (``counts``: each sample's positions): probe means per sample, then mean and standard error."""
    probes = int(terms.shape[1])
    t = terms.sum(dim=1) / probes
    return _curvature(t.sum(dim=0), (t**2).sum(dim=0), len(counts), sum(counts), probes, metric)


def _piece_reduction(unit: Any, leaf: int, lo: int, hi: int,
                     linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     delta: torch.Tensor) -> UnitReduction:
    return UnitReduction([unit], [leaf], lambda g, _: linear(g[lo:hi], delta))


def _bound(term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           deltas: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda g, i: term(g, deltas[i])
