"""The ``gauss-newton`` estimator: the sampled Gauss–Newton quadratic form of the output
distortion per unit and option, with the correlations inside each output row (default) or inside
the whole unit. The curvature library it shares with ``fisher``, ``hessian-trace`` and the
sequential mode is :mod:`sensitivity._curvature` (whose doc derives the estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from allocator.core.errors import InvalidParameterError
from sensitivity._base import EstimateContext, SampleMeanEstimator, UnitCosts
from sensitivity._curvature.passes import curvature_in_passes
from sensitivity._curvature.sampling import check_chunk, check_per_sample, check_probes
from sensitivity._curvature.split import SplitTerm, already_finished
from sensitivity._curvature.terms import gn_inner_products, gn_quadratic_terms, gn_row_terms, gn_square
from sensitivity._deltas import DEFAULT_DELTA_BUDGET_MB, check_delta_budget

if TYPE_CHECKING:
    import torch

__all__ = ["GN_CORRELATIONS", "GN_ROWS_SPLIT", "GN_SPLIT", "GaussNewtonEstimator", "gn_form"]

#: ``½⟨ΔW, g⟩²`` from its inner product, which is linear in the weights and in the gradient
GN_SPLIT = SplitTerm(linear=gn_inner_products, finish=gn_square, additive=True)
#: ``½ Σ_r ⟨ΔW_r, g_r⟩²`` sums over a unit's rows, but not over two paths of one gradient
GN_ROWS_SPLIT = SplitTerm(linear=gn_row_terms, finish=already_finished)
#: "rows": the row blocks of GN_u (default); "unit": the whole block GN_u
GN_CORRELATIONS = ("rows", "unit")


def gn_form(correlations: str) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], SplitTerm]:
    """The per-(sample, probe) term and its row split for ``correlations`` ("rows" or "unit")."""
    if correlations == "rows":
        return gn_row_terms, GN_ROWS_SPLIT
    if correlations == "unit":
        return gn_quadratic_terms, GN_SPLIT
    raise InvalidParameterError(f"correlations must be one of {GN_CORRELATIONS}, got {correlations!r}")


class GaussNewtonEstimator(SampleMeanEstimator):
    """Sampled Gauss–Newton form of the output distortion (:mod:`sensitivity._curvature`):

        correlations="rows":  cost(u, o) = ½ mean_{s,k} Σ_r ⟨ΔW_{u,o,r}, g_{s,k,u,r}⟩²
                                          →  ½ Σ_r ΔW_r GN_{u,rr} ΔW_rᵀ   (unbiased),
        correlations="unit":  cost(u, o) = ½ mean_{s,k} ⟨ΔW_{u,o}, g_{s,k,u}⟩²  →  ½ ΔWᵀ GN_u ΔW,

    ``g_{s,k} = Jᵀ v_{s,k}`` with sampled output cotangents (``E[v vᵀ] = H_D``), weighted so the
    cost predicts the evaluator's per-position mean distortion (token-mean KL for causal LMs,
    per-example KL for classifiers, mean 1 − cos for encoders). Unlike diagonal or trace scores
    it keeps the correlations between the weights of a row (the input-side structure GPTQ's
    ``X Xᵀ`` describes); it is never negative.

    The default keeps the row blocks of GN_u only (:func:`~sensitivity._curvature.terms.gn_row_terms`):
    the cross-row terms have mean zero for rounding errors that are independent between rows,
    and in the whole-unit form they are noise that a few dozen samples do not average out.
    ``benchmarks/ranking.py`` measures what that buys: see docs/ranking.md.
    A sample mean over the calibration batches, so it shards by batch
    (:class:`~sensitivity._base.SampleMeanEstimator`).

    Memory: the float32 deltas of all units and options (4 bytes × options per weight) are held
    at most ``delta_budget_mb`` at a time: beyond it the units are split into groups, one pass
    over the data each, with the same table (:mod:`sensitivity._deltas`).

    Args:
        correlations: ``rows`` (GN's row blocks; default) or ``unit`` (the whole unit block).
        probes: output cotangents per sample (1–4 is enough: the samples already average).
        chunk: rows per forward pass (each (row, probe) gets its own backward).
        per_sample: ``auto`` (vmap on GPU and for small models), ``loop`` or ``vmap``.
        delta_budget_mb: MiB of deltas held per pass (more passes when exceeded).
        by_blocks: factor each backward over the transformer blocks where the model allows it
            (:mod:`sensitivity._sequential_curvature`: the same table, one forward and backward per
            row instead of one per group of units; SmolLM2-135M at defaults: 13 passes' work
            done in about one); False: the passes over the data.
    """

    name: ClassVar[str] = "gauss-newton"

    def __init__(self, *, correlations: str = "rows", probes: int = 2, chunk: int = 1,
                 per_sample: str = "auto", delta_budget_mb: float = DEFAULT_DELTA_BUDGET_MB,
                 by_blocks: bool = True) -> None:
        gn_form(correlations)  # validates
        self.correlations = correlations
        if not isinstance(by_blocks, bool):
            raise InvalidParameterError(f"by_blocks must be true or false, got {by_blocks!r}")
        self.by_blocks = by_blocks
        self.probes = check_probes(probes)
        self.chunk = check_chunk(chunk)
        self.per_sample = check_per_sample(per_sample)
        check_delta_budget(delta_budget_mb)
        self.delta_budget_mb = delta_budget_mb

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        term, split = gn_form(self.correlations)
        return curvature_in_passes(model, ctx, term, squared=False,
                                   budget_bytes=check_delta_budget(self.delta_budget_mb),
                                   probes=self.probes, chunk=self.chunk, per_sample=self.per_sample,
                                   label="gauss-newton", split=split, by_blocks=self.by_blocks)
