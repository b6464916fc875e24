"""Weight-statistics estimators: ``datafree`` (KL / relative MSE), ``zd`` (data-free), ``lim``.

``datafree`` scores each (unit, option) from the weights alone:

* ``score="kl"`` — statistical pre-calibration (arXiv 2501.09107) keeps the distribution of the
  quantized weights close to the original one; its KL is our cost:
  cost(i, b) = KL(p_W ‖ p_Q(W)) = Σ_k p_W[k] · log(p_W[k] / p_Q[k]).
  Binning: ``bins`` (default 256) equal-width bins over [min, max] of W ∪ Q_b(W) of the unit;
  both histograms get add-½ (Krichevsky–Trofimov) pseudo-counts so that bins that Q_b(W) leaves
  empty (between grid levels, the signature of coarse formats) cost a finite, large amount.
* ``score="mse"`` — relative quantization error ‖ΔW‖² / ‖W‖².

``zd`` and ``lim`` are the two layer-importance scores of Layer-wise Quant (arXiv 2406.17415),
turned into per-option costs with the option's relative error (methods.md, one-score methods):
cost(i, b) = score_i · ‖Q_b(W_i) − W_i‖² / ‖W_i‖².

* ZD_i = share of weights with |z| > ``threshold`` (z = (w − μ)/σ over the weights of the
  transformer block holding the unit, default; ``per="unit"`` uses the unit's own weights).
  The paper's threshold is 1; layers with more large-z weights are the more important ones.
* LIM_i = −cos(x_in, x_out) of the block holding the unit (token-averaged over calibration
  data). Because −cos ∈ [−1, 1] and costs must be ≥ 0, the multiplier is 1 + LIM = 1 − cos
  (same order). Units outside every block (head, pooler) get the largest block score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.units import Unit, unit_weight
from allocator.model.outputs import model_inputs
from sensitivity._activation_cache import find_blocks
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors

if TYPE_CHECKING:
    import torch

    from allocator.model.quant import Quantizer

__all__ = [
    "DataFreeEstimator",
    "LimEstimator",
    "ZdEstimator",
    "block_index",
    "histogram_kl",
    "lim_scores",
    "relative_errors",
    "zd_share",
]


def histogram_kl(w: torch.Tensor, q: torch.Tensor, *, bins: int = 256) -> float:
    """KL(p_W ‖ p_Q) of two weight tensors on shared equal-width bins (add-½ smoothing)."""
    import torch

    a, b = w.detach().float().flatten(), q.detach().float().flatten()
    lo = float(torch.minimum(a.min(), b.min()))
    hi = float(torch.maximum(a.max(), b.max()))
    if hi <= lo:
        return 0.0
    def hist(x: torch.Tensor) -> torch.Tensor:
        idx = ((x - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
        return torch.bincount(idx, minlength=bins).double() + 0.5

    pw, pq = hist(a), hist(b)
    pw, pq = pw / pw.sum(), pq / pq.sum()
    return max(float((pw * (pw / pq).log()).sum()), 0.0)


def zd_share(w: torch.Tensor, *, threshold: float = 1.0) -> float:
    """ZD = (1/n) Σ_j 1[|w_j − μ| / σ > threshold] (share of large-z weights)."""
    x = w.detach().double().flatten()
    sd = float(x.std())
    if x.numel() < 2 or sd == 0.0:
        return 0.0
    return float(((x - x.mean()).abs() / sd > threshold).double().mean())


def relative_errors(model: torch.nn.Module, units: Sequence[Unit], options: Sequence[Any],
                    quantizer: Quantizer | None = None) -> np.ndarray:
    """‖Q_b(W_i) − W_i‖² / ‖W_i‖² for every unit i and option b (0 for an all-zero weight)."""
    err = quant_errors(model, units, options, quantizer)
    norms = np.array([float(unit_weight(model, u).detach().double().pow(2).sum()) for u in units])
    return err / np.where(norms > 0, norms, 1.0)[:, None]


def block_index(prefix: str, n_blocks: int, module: str) -> int | None:
    """Index of the block ``prefix.<k>`` that holds ``module``, or None."""
    if not prefix:
        return None
    m = re.match(rf"^{re.escape(prefix)}\.(\d+)(?:\.|$)", module)
    return int(m[1]) if m and int(m[1]) < n_blocks else None


class DataFreeEstimator(BaseEstimator):
    """Weight-only costs: KL of the weight histograms (arXiv 2501.09107) or relative MSE.

    Args:
        score: ``kl`` (default) or ``mse``.
        bins: histogram bins for ``kl``.
    """

    name: ClassVar[str] = "datafree"
    needs_data: ClassVar[bool] = False

    def __init__(self, *, score: str = "kl", bins: int = 256) -> None:
        if score not in ("kl", "mse"):
            raise InvalidParameterError(f"score must be 'kl' or 'mse', got {score!r}")
        if not isinstance(bins, int) or bins < 2:
            raise InvalidParameterError(f"bins must be an int ≥ 2, got {bins!r}")
        self.score = score
        self.bins = bins

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        import torch

        if self.score == "mse":
            return UnitCosts(cost=relative_errors(model, ctx.units, ctx.options, ctx.quantizer))
        cost = np.zeros((len(ctx.units), len(ctx.options)))
        with torch.no_grad():
            for i, unit in enumerate(ctx.units):
                w = unit_weight(model, unit).detach().float()
                for j, fmt in enumerate(ctx.options):
                    cost[i, j] = histogram_kl(w, ctx.quantizer.quantize(unit, w, fmt), bins=self.bins)
        return UnitCosts(cost=cost, info={"binning": f"{self.bins} equal-width bins, add-1/2"})


class ZdEstimator(BaseEstimator):
    """Z-score-distribution importance (Layer-wise Quant, arXiv 2406.17415) × relative error.

    Args:
        threshold: |z| above which a weight counts (paper: 1).
        per: ``block`` (paper: all weights of the transformer block) or ``unit``.
    """

    name: ClassVar[str] = "zd"
    needs_data: ClassVar[bool] = False

    def __init__(self, *, threshold: float = 1.0, per: str = "block") -> None:
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise InvalidParameterError(f"threshold must be a finite number > 0, got {threshold!r}")
        if per not in ("block", "unit"):
            raise InvalidParameterError(f"per must be 'block' or 'unit', got {per!r}")
        self.threshold = float(threshold)
        self.per = per

    def scores(self, model: torch.nn.Module, units: Sequence[Unit]) -> np.ndarray:
        import torch

        found = find_blocks(model) if self.per == "block" else None
        prefix, n_blocks = (found[0], len(found[1])) if found else ("", 0)
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(units):
            k = block_index(prefix, n_blocks, u.module)
            groups.setdefault(f"block{k}" if k is not None else f"unit{i}", []).append(i)
        out = np.zeros(len(units))
        with torch.no_grad():
            for members in groups.values():
                w = torch.cat([unit_weight(model, units[i]).detach().flatten() for i in members])
                out[members] = zd_share(w, threshold=self.threshold)
        return out

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        score = self.scores(model, ctx.units)
        cost = score[:, None] * relative_errors(model, ctx.units, ctx.options, ctx.quantizer)
        return UnitCosts(cost=cost, info={"scores": score.tolist()})


def lim_scores(model: torch.nn.Module, ctx: EstimateContext) -> tuple[np.ndarray, np.ndarray]:
    """(LIM per block, LIM per unit): LIM_k = −mean_tokens cos(x_in, x_out) of block k."""
    import torch

    if not ctx.batches:
        raise InvalidParameterError(
            "estimator 'lim' needs calibration data; pass --data or use the built-in corpus"
        )
    found = find_blocks(model)
    if found is None:
        raise ModelError("lim needs a transformer block list (model.layers / encoder.layer / transformer.h)")
    prefix, blocks = found
    sums, counts = np.zeros(len(blocks)), np.zeros(len(blocks))
    mask: list[torch.Tensor | None] = [None]

    def hook(k: int) -> Any:
        def fn(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x_in = args[0] if args else kwargs.get("hidden_states")
            x_out = out[0] if isinstance(out, tuple | list) else out
            if not isinstance(x_in, torch.Tensor) or not isinstance(x_out, torch.Tensor):
                raise ModelError(f"block {k} of {prefix!r} has no hidden-state tensor input/output")
            cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            m = mask[0]
            w = torch.ones_like(cos) if m is None or m.shape != cos.shape else m.to(cos.dtype)
            sums[k] += float((cos * w).sum())
            counts[k] += float(w.sum())
        return fn

    handles = [b.register_forward_hook(hook(k), with_kwargs=True) for k, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in ctx.batches:
                am = batch.get("attention_mask")
                mask[0] = am if isinstance(am, torch.Tensor) else None
                model(**model_inputs(batch, ctx.model_kind))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if np.any(counts == 0):
        raise ModelError("some transformer blocks were never called; lim cannot score them")
    per_block = -(sums / counts)
    per_unit = np.empty(len(ctx.units))
    for i, u in enumerate(ctx.units):
        k = block_index(prefix, len(blocks), u.module)
        per_unit[i] = per_block[k] if k is not None else per_block.max()
    return per_block, per_unit


class LimEstimator(BaseEstimator):
    """Layer Input Modification (Layer-wise Quant, arXiv 2406.17415) × relative error.

    cost(i, b) = (1 + LIM_k(i)) · ‖ΔW_i‖² / ‖W_i‖², LIM_k = −cos(x_in, x_out) of block k.
    """

    name: ClassVar[str] = "lim"
    needs_data: ClassVar[bool] = True

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        per_block, per_unit = lim_scores(model, ctx)
        cost = (1.0 + per_unit)[:, None] * relative_errors(model, ctx.units, ctx.options, ctx.quantizer)
        return UnitCosts(cost=np.maximum(cost, 0.0), info={"lim_per_block": per_block.tolist()})
