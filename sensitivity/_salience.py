"""Layer-wise reconstruction Hessians H = 2XXᵀ: SliM-LLM salience and the BAQ Hessian proxy.

For a linear unit ``y = W x`` the layer-wise reconstruction loss ``‖WX − Q(W)X‖²`` has the
Hessian ``H = 2 X Xᵀ`` w.r.t. each row of W (X = the unit's input tokens as columns). It is
accumulated from forward hooks, streaming like GPTQ's ``add_batch``; padding tokens (attention
mask 0) are skipped and the sum is normalised by the token count:

    H = (2 / N_tok) Σ_t x_t x_tᵀ.

``salience`` — SliM-LLM (arXiv 2405.14917). The paper writes the element salience as
``δ_j = w_j² / [H⁻¹]_jj²``; its code (``slim_gptq.py``, like GPTQ) reads ``[H⁻¹]_jj`` off the
*upper Cholesky factor* U of the damped inverse (``H⁻¹ = UᵀU``), and so do we:

    H_d = H + λ·mean(diag H)·I  (λ = ``percdamp``, 0.01; dead columns get H_cc = 1),
    U = chol_upper(H_d⁻¹),   d_c = U_cc,   δ_rc = W_rc² / d_c².

δ_rc is (twice) the OBS loss of removing weight W_rc. Quantizing it instead removes the
fraction ΔW_rc / W_rc, so under the same quadratic model the predicted loss is

    cost(i, b) = ½ Σ_{rc ∈ unit} δ_rc (ΔW_rc / W_rc)² = ½ Σ_{rc} ΔW_rc² / d_c²,

which is exactly GPTQ's / SliM-LLM's per-column loss term ``(w − q)²/d²`` summed (× ½) for RTN
errors without error feedback. A column-group unit (``[g=k]``) sums its own columns, i.e. the
paper's group salience; the table records Σ δ per unit as ``salience`` in the metadata.

``hessian-proxy`` — BAQ (arXiv 2506.05664): only the diagonal is needed,

    cost(i, b) = Σ_{rc ∈ unit} H_cc ΔW_rc² = (2/N_tok) Σ_t ‖ΔW x_t‖² restricted to diag(XXᵀ),

the reconstruction error with cross-column terms dropped (BAQ's closed form then models
ΔW² ∝ range²·2^(−2b)/12; here ΔW is the actual RTN error of each option).

Only ``Linear`` units are supported (conv inputs would need unfolding).

Sharding: both estimators are batch-additive (:class:`~sensitivity._base.BatchAdditiveEstimator`):
the partial statistics are the raw sums ``Σ_t x_t x_tᵀ`` (or their diagonal) and the token count
N_tok per module, which add over batches; the damping, inverse and Cholesky factor (salience)
are applied once, to the merged H. A salience partial holds a columns × columns matrix per
module (8·d² bytes), a hessian-proxy one only its diagonal.

Memory: in one process, ``salience`` holds at most ``hessian_budget_mb`` (default 1024 MiB) of
those matrices at a time. Beyond it the modules are split into the fewest balanced consecutive
groups (:func:`~sensitivity._deltas.balanced_groups`) and the data is run forward once per group;
each group's H is reduced to its d_c at once and freed. The table does not depend on the split
(the sums are the same, per module), and ``passes`` in the metadata records it. A Llama-shaped
1B model has 7.1 GB of them (d = 2048 … 5504, 113 modules); all at once, plus their damped
copies, exceeded 18 GB. A shard's partial still holds every module's sums: it is what merges.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.units import Unit, UnitKind, get_module, unit_weight, weight_view
from allocator.model.kind import ModelKind
from sensitivity._base import BatchAdditiveEstimator, EstimateContext, Partial, UnitCosts
from sensitivity._deltas import balanced_groups, check_delta_budget
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

    from allocator.model.quant import Quantizer

__all__ = [
    "HessianProxyEstimator",
    "InputHessian",
    "SalienceEstimator",
    "collect_input_hessians",
    "column_square_sums",
    "inverse_cholesky_diag",
]

_NON_INPUT_KEYS = ("labels", "label")

#: float64 input Hessians (8·d² bytes per module) ``salience`` holds per pass, in MiB
DEFAULT_HESSIAN_BUDGET_MB = 1024


class InputHessian:
    """Streaming ``H = (2/N) Σ_t x_t x_tᵀ`` of one module's inputs (or its diagonal only)."""

    def __init__(self, columns: int, *, diagonal: bool, device: Any = None) -> None:
        import torch

        self.diagonal = diagonal
        shape = (columns,) if diagonal else (columns, columns)
        self._sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add input rows ``x`` ([tokens, columns])."""
        x64 = x.detach().reshape(-1, x.shape[-1]).to(self._sum.dtype)
        self._sum += (x64**2).sum(0) if self.diagonal else x64.T @ x64
        self.tokens += x64.shape[0]

    @property
    def total(self) -> torch.Tensor:
        """The raw sum ``Σ_t x_t x_tᵀ`` (or its diagonal), float64: what adds over batches."""
        return self._sum

    def finalize(self) -> torch.Tensor:
        """H (float64); all zeros if no token was seen."""
        return hessian_of(self._sum, self.tokens)


def hessian_of(total: torch.Tensor, tokens: int) -> torch.Tensor:
    """``H = (2/N_tok) Σ_t x_t x_tᵀ`` from the sum and the token count (zeros for no token)."""
    return total * (2.0 / max(tokens, 1))


def _token_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else m.bool()


@contextmanager
def _hooks(model: torch.nn.Module, stats: Mapping[str, InputHessian],
           mask_ref: list[torch.Tensor | None]) -> Iterator[None]:
    handles = []
    for name, acc in stats.items():
        def hook(_m: Any, args: tuple[Any, ...], acc: InputHessian = acc) -> None:
            x = args[0]
            mask = mask_ref[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            acc.add_batch(x)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def collect_input_hessians(model: torch.nn.Module, ctx: EstimateContext, *,
                           diagonal: bool) -> dict[str, torch.Tensor]:
    """H (or its diagonal) of every unit module's input over the calibration batches."""
    stats = input_sums(model, ctx, diagonal=diagonal)
    check_tokens({n: s.tokens for n, s in stats.items()})
    return {n: s.finalize() for n, s in stats.items()}


def check_tokens(tokens: Mapping[str, int]) -> None:
    """Refuse modules that never saw a calibration token (their H is undefined)."""
    empty = [n for n, t in tokens.items() if t == 0]
    if empty:
        raise ModelError(f"modules {empty[:3]} never ran on the calibration data; exclude them "
                         "(--exclude) or check the model kind")


def unit_module_widths(model: torch.nn.Module, ctx: EstimateContext) -> dict[str, int]:
    """Input width of every module a unit of ``ctx`` lives in, in unit order (Linear only)."""
    widths: dict[str, int] = {}
    for unit in ctx.units:
        if unit.kind is not UnitKind.LINEAR:
            raise InvalidParameterError(
                f"unit {unit.name!r} is a {unit.kind} module; this estimator supports Linear units "
                "only (pass kinds=linear)")
        if unit.module not in widths:
            widths[unit.module] = int(weight_view(get_module(model, unit.module), unit.module).shape[1])
    return widths


def input_sums(model: torch.nn.Module, ctx: EstimateContext, *, diagonal: bool,
               modules: Sequence[str] | None = None) -> dict[str, InputHessian]:
    """The streaming sums of the inputs of ``modules`` (default: every unit's module) over
    ``ctx.batches`` (not normalised); one forward per batch."""
    import torch

    widths = unit_module_widths(model, ctx)
    stats = {name: InputHessian(widths[name], diagonal=diagonal,
                                device=_device_of(get_module(model, name)))
             for name in (widths if modules is None else modules)}
    mask_ref: list[torch.Tensor | None] = [None]
    training = model.training
    model.eval()
    try:
        with _hooks(model, stats, mask_ref), torch.no_grad(), progress_bar(
                len(ctx.batches), "activation statistics", ctx.progress) as bar:
            for batch in ctx.batches:
                mask_ref[0] = _token_mask(batch)
                inputs = {k: v for k, v in batch.items() if k not in _NON_INPUT_KEYS}
                if ctx.model_kind == ModelKind.CAUSAL_LM:
                    inputs.setdefault("use_cache", False)
                model(**inputs)
                bar.update(1)
    finally:
        model.train(training)
    return stats


def _device_of(module: torch.nn.Module) -> torch.device:
    return weight_view(module).device


def _partial_sums(model: torch.nn.Module, ctx: EstimateContext, *, diagonal: bool) -> Partial:
    """Σ x xᵀ (or its diagonal) as ``H:<module>`` and N_tok as ``tokens:<module>``."""
    stats = input_sums(model, ctx, diagonal=diagonal)
    return Partial(sums={f"H:{n}": s.total.cpu().numpy() for n, s in stats.items()},
                   counts={f"tokens:{n}": s.tokens for n, s in stats.items()})


def _merged_hessians(model: torch.nn.Module, partial: Partial) -> Iterator[tuple[str, torch.Tensor]]:
    """(module, H) from merged sums, one module at a time, on the module's device (float64)."""
    import torch

    tokens = {k.removeprefix("tokens:"): int(v) for k, v in partial.counts.items()}
    check_tokens(tokens)
    for name, n_tok in tokens.items():
        total = torch.from_numpy(partial.sums[f"H:{name}"]).to(_device_of(get_module(model, name)))
        yield name, hessian_of(total, n_tok)


def inverse_cholesky_diag(h: torch.Tensor, *, percdamp: float = 0.01) -> torch.Tensor:
    """``d = diag(chol_upper((H + λ·mean(diag H)·I)⁻¹))`` as GPTQ / SliM-LLM compute it.

    Dead columns (H_cc = 0: the input is always zero) get H_cc = 1 first, as in GPTQ.
    """
    import torch

    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += percdamp * torch.mean(torch.diag(h))
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError:  # torch raises a LinAlgError subclass of RuntimeError
        raise ModelError("the input Hessian is not positive definite even after damping; "
                         "raise percdamp") from None
    inv = torch.cholesky_inverse(lower)
    return torch.diag(torch.linalg.cholesky(inv, upper=True))


def column_square_sums(model: torch.nn.Module, unit: Unit, options: Sequence[Any],
                       quantizer: Quantizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_r W_rc²`` ([cols]) and ``Σ_r ΔW_{o,rc}²`` ([options, cols]), float64 sums of float32
    squares, with ``quantizer`` (RTN by default).

    Both costs below are column-weighted sums of these, so one option's ΔW at a time is enough:
    the transient memory is one unit's weight, not options × weight in float64 (a 1B model's
    32000 × 2048 head would need 4 GB)."""
    import torch

    from allocator.model.quant import RtnQuantizer

    q = quantizer or RtnQuantizer()
    w = unit_weight(model, unit).detach().float()
    w = w.reshape(w.shape[0], -1)
    sums = []
    for f in options:
        d = q.quantize(unit, w, f) - w
        sums.append(torch.sum(d * d, dim=0, dtype=torch.float64))
        del d
    return torch.sum(w * w, dim=0, dtype=torch.float64), torch.stack(sums)


def _cols(unit: Unit) -> slice:
    return slice(*unit.columns) if unit.columns is not None else slice(None)


class SalienceEstimator(BatchAdditiveEstimator):
    """SliM-LLM salience-weighted error: cost(i, b) = ½ Σ_j ΔW_j² / d_c(j)² (module doc).

    Args:
        percdamp: damping λ relative to mean(diag H) (GPTQ / SliM-LLM: 0.01).
    """

    name: ClassVar[str] = "salience"

    def __init__(self, *, percdamp: float = 0.01,
                 hessian_budget_mb: float = DEFAULT_HESSIAN_BUDGET_MB) -> None:
        if isinstance(percdamp, bool) or not isinstance(percdamp, int | float) or not percdamp > 0:
            raise InvalidParameterError(f"percdamp must be a number > 0, got {percdamp!r}")
        self.percdamp = float(percdamp)
        check_delta_budget(hessian_budget_mb, name="hessian_budget_mb", held="input Hessians")
        self.hessian_budget_mb = hessian_budget_mb

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        """Unsharded: the modules' H in passes that each hold at most ``hessian_budget_mb``."""
        widths = unit_module_widths(model, ctx)
        names = list(widths)
        budget = check_delta_budget(self.hessian_budget_mb, name="hessian_budget_mb",
                                    held="input Hessians")
        groups = balanced_groups([8 * widths[n] ** 2 for n in names], budget)
        inv_d2: dict[str, torch.Tensor] = {}
        for group in groups:
            stats = input_sums(model, ctx, diagonal=False, modules=[names[i] for i in group])
            check_tokens({n: s.tokens for n, s in stats.items()})
            for name in list(stats):
                inv_d2[name] = self._inv_d2(stats.pop(name).finalize())
        costs = self._unit_costs(model, ctx, inv_d2)
        return UnitCosts(cost=costs.cost, info={**costs.info, "passes": len(groups)})

    def _partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        return _partial_sums(model, ctx, diagonal=False)

    def _finish(self, model: torch.nn.Module, ctx: EstimateContext, partial: Partial) -> UnitCosts:
        return self._unit_costs(model, ctx, {n: self._inv_d2(h) for n, h in _merged_hessians(model, partial)})

    def _inv_d2(self, h: torch.Tensor) -> torch.Tensor:
        return 1.0 / inverse_cholesky_diag(h, percdamp=self.percdamp) ** 2

    @staticmethod
    def _unit_costs(model: torch.nn.Module, ctx: EstimateContext,
                    inv_d2: Mapping[str, torch.Tensor]) -> UnitCosts:
        cost = np.empty((len(ctx.units), len(ctx.options)))
        salience = np.empty(len(ctx.units))
        for i, unit in enumerate(ctx.units):
            w2, d2 = column_square_sums(model, unit, ctx.options, ctx.quantizer)
            scale = inv_d2[unit.module][_cols(unit)].to(w2.device, w2.dtype)
            salience[i] = float(w2 @ scale)
            cost[i] = 0.5 * (d2 @ scale).cpu().numpy()
        return UnitCosts(cost=cost, info={"salience": salience.tolist()})


class HessianProxyEstimator(BatchAdditiveEstimator):
    """BAQ Hessian proxy: cost(i, b) = Σ_j H_cc ΔW_j², H = 2XXᵀ/N_tok (diagonal only)."""

    name: ClassVar[str] = "hessian-proxy"

    def _partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        return _partial_sums(model, ctx, diagonal=True)

    def _finish(self, model: torch.nn.Module, ctx: EstimateContext, partial: Partial) -> UnitCosts:
        diag = dict(_merged_hessians(model, partial))  # diagonals: d floats per module
        cost = np.empty((len(ctx.units), len(ctx.options)))
        for i, unit in enumerate(ctx.units):
            _, d2 = column_square_sums(model, unit, ctx.options, ctx.quantizer)
            h = diag[unit.module][_cols(unit)].to(d2.device, d2.dtype)
            cost[i] = (d2 @ h).cpu().numpy()
        return UnitCosts(cost=cost)
