"""``relevance``: Layer-wise Relevance Propagation contribution per unit (LRP-QViT, arXiv 2401.11243).

LRP redistributes the explained output f backwards so that (up to bias/ε absorption) relevance is
conserved layer by layer. We implement it as "modified gradient × input": every module's forward
output keeps its value but gets a gradient such that R(x) = x ⊙ ∂̃f/∂x is the rule's relevance.

* Linear, LRP-ε: z = Wa + b, R_j = Σ_k a_j w_kj R_k / (z_k + ε·sign(z_k)) (sign(0) = 1, as
  captum). Realised by scaling the gradient at z by z / (z + ε·sign z).
* Element-wise activations (ReLU, GELU, SiLU, tanh …): identity rule R_in = R_out (gradient
  scaled by y/x), as in Ali et al. 2022 ("XAI for Transformers: Better Explanations through
  Conservative Propagation").
* LayerNorm / RMSNorm, LN-rule (Ali et al. 2022): the normaliser σ (rms) is detached, so the
  norm is a linear map and gradient × input is conservative through it.
* Attention, AH-rule (Ali et al. 2022): the softmax attention probabilities are detached, so
  relevance flows through the value path only. Done by swapping
  ``F.scaled_dot_product_attention`` and ``F.softmax`` for detached versions during the pass.
* Residual sums and mean-pooling are linear: gradient × input splits relevance proportionally.
  Element-wise products of two activations (gated MLPs) use plain gradient × input (both
  factors get the product's relevance; no extra rule).

Explained output f: for models with logits, Σ over (valid) positions of the arg-max logit; for
encoders Σ_samples ‖mean-pooled embedding‖ (relevance = p ⊙ p/‖p‖ at the pooled vector).
Score of unit i = Σ|R| at the unit's output (all samples, tokens, features) / Σ over all units;
cost(i, b) = score_i · ‖ΔW_i‖² / ‖W_i‖². Under the AH-rule query/key projections receive no
relevance (they only feed the detached probabilities); like LRP-QViT's fused qkv layer they take
the mean relevance of their sibling projections (V, O) instead — see :func:`_share_with_siblings`.

Sharding: batch-additive (:class:`~sensitivity._base.BatchAdditiveEstimator`). The statistic is
T_m = Σ_batches Σ|R| at each unit module m, a plain sum; the sibling sharing, the column shares
and the normalisation by Σ_m T_m are applied once, to the merged totals. No random draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.units import Unit, is_linear_like
from allocator.model.kind import ModelKind
from allocator.model.outputs import model_inputs
from sensitivity._base import BatchAdditiveEstimator, EstimateContext, Partial, UnitCosts
from sensitivity._datafree import relative_errors

if TYPE_CHECKING:
    import torch

__all__ = ["RelevanceEstimator", "lrp_mode", "lrp_relevances", "relevance_scores",
           "relevance_totals", "scores_of"]


def _keep_value(out: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``out`` whose gradient is that of ``lin``."""
    return lin + (out - lin).detach()


def _linear_hook(eps: float) -> Any:
    import torch

    def hook(_m: Any, _args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            return None
        sign = torch.where(out >= 0, 1.0, -1.0).to(out.dtype)
        ratio = (out / (out + eps * sign)).detach()
        return _keep_value(out, out * ratio)

    return hook


def _activation_hook(_m: Any, args: tuple[Any, ...], out: Any) -> Any:
    import torch

    x = args[0] if args else None
    if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) or x.shape != out.shape:
        return None
    small = x.abs() < 1e-12
    ratio = torch.where(small, torch.zeros_like(x), out / torch.where(small, torch.ones_like(x), x))
    return _keep_value(out, x * ratio.detach())


def _norm_hook(mod: Any, args: tuple[Any, ...], out: Any) -> Any:
    import torch

    x = args[0] if args else None
    if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) or x.shape != out.shape:
        return None
    eps = float(getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-5)) or 1e-5)
    xf = x.float()
    if "rms" in type(mod).__name__.lower():
        lin = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
    else:
        c = xf - xf.mean(-1, keepdim=True)
        lin = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps).detach()
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor):
        lin = lin * w
    return _keep_value(out, lin.to(out.dtype))


def _is_activation(mod: torch.nn.Module) -> bool:
    import torch

    if any(True for _ in mod.children()) or any(True for _ in mod.parameters(recurse=False)):
        return False
    if isinstance(mod, torch.nn.Softmax | torch.nn.LogSoftmax | torch.nn.MultiheadAttention):
        return False
    cls = type(mod)
    return cls.__module__ == "torch.nn.modules.activation" or cls.__module__.endswith(".activations")


def _is_norm(mod: torch.nn.Module) -> bool:
    import torch

    name = type(mod).__name__
    return isinstance(mod, torch.nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


def _sdpa_detached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with detached probabilities (AH-rule); no dropout."""
    import torch

    if enable_gqa and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * s
    low = torch.finfo(scores.dtype).min
    if is_causal:
        n, m = scores.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril(m - n)
        scores = scores.masked_fill(~keep, low)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, low) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype).detach()
    return probs @ value


@contextmanager
def lrp_mode(model: torch.nn.Module, *, epsilon: float = 1e-6) -> Iterator[None]:
    """Within the block, ``model``'s gradients are LRP's (see module doc): R(x) = x ⊙ grad."""
    import torch.nn.functional as F

    handles = []
    for mod in model.modules():
        if is_linear_like(mod):
            handles.append(mod.register_forward_hook(_linear_hook(epsilon)))
        elif _is_norm(mod):
            handles.append(mod.register_forward_hook(_norm_hook))
        elif _is_activation(mod):
            handles.append(mod.register_forward_hook(_activation_hook))
    orig_sdpa, orig_softmax = F.scaled_dot_product_attention, F.softmax

    def softmax_detached(*a: Any, **k: Any) -> torch.Tensor:
        return orig_softmax(*a, **k).detach()

    F.scaled_dot_product_attention = _sdpa_detached
    F.softmax = softmax_detached
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig_sdpa
        F.softmax = orig_softmax
        for h in handles:
            h.remove()


def _explained(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """The scalar f whose relevance is propagated (see module doc)."""
    import torch

    out = model(**model_inputs(batch, kind))
    logits = getattr(out, "logits", None)
    if logits is None and kind in (ModelKind.CAUSAL_LM, ModelKind.CLASSIFIER):
        logits = out[0] if isinstance(out, tuple | list) else out
    am = batch.get("attention_mask")
    if isinstance(logits, torch.Tensor) and kind != "encoder":
        top = logits.gather(-1, logits.detach().argmax(-1, keepdim=True)).squeeze(-1)
        if top.dim() == 2 and isinstance(am, torch.Tensor) and am.shape == top.shape:
            top = top * am.to(top.dtype)
        return top.sum()
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(hidden, torch.Tensor):
        raise ModelError("model returned neither logits nor a hidden-state tensor to explain")
    if hidden.dim() == 3:
        m = (torch.ones(hidden.shape[:2], device=hidden.device) if am is None
             else am.to(hidden.device, hidden.dtype))
        hidden = (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
    unit_dir = hidden.detach() / hidden.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (hidden * unit_dir).sum()


def lrp_relevances(model: torch.nn.Module, batch: Mapping[str, Any], modules: Sequence[str], *,
                   kind: str = "generic", epsilon: float = 1e-6) -> list[torch.Tensor]:
    """Relevance R = z ⊙ ∂̃f/∂z at the output z of each named module, for one batch."""
    import torch

    outs: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), lrp_mode(model, epsilon=epsilon):
        handles = []
        for name in modules:
            def grab(_m: Any, _a: Any, out: Any, name: str = name) -> None:
                if name in outs:
                    raise ModelError(f"module {name!r} runs twice in one forward; LRP needs one call")
                outs[name] = out
            # Registered after lrp_mode's hooks, so it sees the LRP-modified output.
            handles.append(model.get_submodule(name).register_forward_hook(grab))
        try:
            f = _explained(model, batch, kind)
            missing = [n for n in modules if n not in outs]
            if missing:
                raise ModelError(f"modules {missing[:3]} were not called by the forward pass")
            grads = torch.autograd.grad(f, [outs[n] for n in modules], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    return [outs[n].detach() * (g if g is not None else torch.zeros_like(outs[n]))
            for n, g in zip(modules, grads, strict=True)]


def relevance_scores(model: torch.nn.Module, ctx: EstimateContext, *, epsilon: float = 1e-6) -> np.ndarray:
    """Share of total |relevance| at each unit's output module (summed over all batches)."""
    return scores_of(ctx.units, relevance_totals(model, ctx, epsilon=epsilon))


def relevance_totals(model: torch.nn.Module, ctx: EstimateContext, *,
                     epsilon: float = 1e-6) -> dict[str, float]:
    """T_m = Σ over ``ctx.batches`` of Σ|R| at each unit module m (sorted by name): additive."""
    if not ctx.batches:
        raise InvalidParameterError(
            "estimator 'relevance' needs calibration data; pass --data or use the built-in corpus"
        )
    modules = sorted({u.module for u in ctx.units})
    total = dict.fromkeys(modules, 0.0)
    was_training = model.training
    model.eval()
    try:
        for batch in ctx.batches:
            rel = lrp_relevances(model, batch, modules, kind=ctx.model_kind, epsilon=epsilon)
            for name, r in zip(modules, rel, strict=True):
                total[name] += float(r.double().abs().sum())
    finally:
        model.train(was_training)
    return total


def scores_of(units: Sequence[Unit], totals: Mapping[str, float]) -> np.ndarray:
    """score_i = share of unit i in Σ|R| after sibling sharing (module doc), from the totals."""
    total = _share_with_siblings(dict(totals))
    raw = np.array([_unit_share(u, total[u.module]) for u in units])
    s = raw.sum()
    return raw / s if s > 0 else np.full(len(raw), 1.0 / len(raw))


def _share_with_siblings(total: dict[str, float]) -> dict[str, float]:
    """Q/K projections only feed the (detached) attention probabilities, so the AH-rule gives
    them no relevance; as LRP-QViT scores a fused qkv layer by its output relevance, a module
    with zero relevance takes the mean of its nonzero siblings (same parent: V, and O where the
    parent holds it). A module with no relevant sibling (an unused pooler) keeps 0."""
    out = dict(total)
    for name, value in total.items():
        if value > 0:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        sib = [v for n, v in total.items() if v > 0 and n != name
               and (n.rsplit(".", 1)[0] if "." in n else "") == parent]
        if sib:
            out[name] = float(np.mean(sib))
    return out


def _unit_share(unit: Unit, module_total: float) -> float:
    # A column-group unit gets its module's relevance in proportion to its columns.
    if unit.columns is None:
        return module_total
    lo, hi = unit.columns
    in_f = 1
    for d in unit.shape[1:]:
        in_f *= d
    return module_total * (hi - lo) / in_f


class RelevanceEstimator(BatchAdditiveEstimator):
    """LRP contribution score (LRP-QViT, arXiv 2401.11243) × relative error; see module doc.

    Args:
        epsilon: ε of the LRP-ε rule on Linear layers.
    """

    name: ClassVar[str] = "relevance"
    needs_data: ClassVar[bool] = True

    def __init__(self, *, epsilon: float = 1e-6) -> None:
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
            raise InvalidParameterError(f"epsilon must be a finite number ≥ 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def _partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        totals = relevance_totals(model, ctx, epsilon=self.epsilon)
        return Partial(sums={"relevance": np.array([totals[m] for m in sorted(totals)])})

    def _finish(self, model: torch.nn.Module, ctx: EstimateContext, partial: Partial) -> UnitCosts:
        modules = sorted({u.module for u in ctx.units})  # the order of _partial's array
        sums = np.asarray(partial.sums["relevance"], dtype=np.float64)
        if sums.shape != (len(modules),):
            raise InvalidParameterError(f"relevance totals of {sums.shape} modules, not "
                                        f"{len(modules)}; were they computed on these units?")
        score = scores_of(ctx.units, {m: float(v) for m, v in zip(modules, sums, strict=True)})
        cost = score[:, None] * relative_errors(model, ctx.units, ctx.options)
        return UnitCosts(cost=cost, info={"scores": score.tolist()})
