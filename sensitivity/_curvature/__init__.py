"""Output-consistent curvature: the Gauss–Newton form of the distortion plans are judged by,
shared by four estimators (``gauss-newton``, ``fisher``, ``hessian-trace`` and the sequential
mode of the first two).

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

The modules, by responsibility: :mod:`.output_metric` (``H_D`` and the cotangents ``v``),
:mod:`.terms` (the per-(sample, probe) terms r), :mod:`.reductions` (r per unit, streamed),
:mod:`.sampling` (the engine: mean and standard error over samples) and :mod:`.passes` (the
same under a memory budget: groups of units, or one unit in row pieces). The deltas ``ΔW`` are
:func:`sensitivity._deltas.quant_deltas`.
"""

from __future__ import annotations

from sensitivity._curvature.output_metric import (
    cosine_cotangent,
    cosine_output_hessian,
    kl_cotangent,
    kl_cotangent_at,
    kl_label,
    output_metric,
    row_cotangents,
    softmax_cdf,
    softmax_fisher,
)
from sensitivity._curvature.passes import curvature_in_passes
from sensitivity._curvature.reductions import Reduction, UnitReduction, streamed_reduce, unit_reduction
from sensitivity._curvature.sampling import (
    PER_SAMPLE_MODES,
    VMAP_BELOW,
    SampledCurvature,
    check_chunk,
    check_per_sample,
    check_probes,
    curvature_from_sums,
    pair_curvature,
    pair_stream,
    pair_terms,
    row_chunks,
    sampled_curvature,
)
from sensitivity._curvature.split import SplitTerm, row_pieces
from sensitivity._curvature.terms import (
    gn_diagonal_terms,
    gn_inner_products,
    gn_quadratic_terms,
    gn_square,
    gn_trace_terms,
)

__all__ = ["PER_SAMPLE_MODES", "VMAP_BELOW", "Reduction", "SampledCurvature", "SplitTerm", "UnitReduction",
           "check_chunk", "check_per_sample", "check_probes", "cosine_cotangent", "cosine_output_hessian",
           "curvature_from_sums", "curvature_in_passes", "gn_diagonal_terms", "gn_inner_products",
           "gn_quadratic_terms", "gn_square", "gn_trace_terms", "kl_cotangent", "kl_cotangent_at", "kl_label",
           "output_metric", "pair_curvature", "pair_stream", "pair_terms", "row_chunks", "row_cotangents",
           "row_pieces",
           "sampled_curvature", "softmax_cdf", "softmax_fisher", "streamed_reduce", "unit_reduction"]
