"""Apply a bit plan to a torch model in place: per-unit fake quantization with RTN, GPTQ or ggml.

Every unit's weight columns are replaced by their dequantized values (``Q(W)`` in the model's
dtype), so the model runs as usual and shows the quantization error of the plan. RTN uses the
shared quantizer (:func:`allocator.model.quant.fake_quantize`); GPTQ (:mod:`allocator.backend._gptq`)
uses the same grids with error feedback from calibration activations; ggml quantizes GGUF
options with llama.cpp's exact algorithm (:func:`allocator.model.quant.ggml_values`, with an
imatrix from the calibration batches when given) and the others with RTN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from allocator.backend._gptq import block_stages
from allocator.backend._resolve import ResolvedUnit, module_weight, resolve_plan
from allocator.core.errors import BackendError, InvalidParameterError, InvalidPlanError
from allocator.core.plan import BitPlan, check_plan
from allocator.core.units import is_linear_like
from allocator.model.quant import fake_quantize
from allocator.model.quant.gptq import collect_hessians, column_formats, gptq_quantize

if TYPE_CHECKING:
    import torch

    from allocator.core.table import CostTable
    from allocator.core.units import Unit

__all__ = ["ApplyMethod", "ApplyReport", "UnitApplied", "apply_plan", "model_inputs"]

_NON_INPUT_KEYS = ("labels", "label")


class ApplyMethod(StrEnum):
    RTN = "rtn"  #: round to nearest per group (shared quantizer)
    GPTQ = "gptq"  #: GPTQ error feedback from calibration activations
    GGML = "ggml"  #: llama.cpp's quantizers for GGUF options (imatrix from calibration), RTN else


@dataclass(frozen=True, kw_only=True)
class UnitApplied:
    unit: str
    option: str
    params: int
    rel_error: float  #: ‖Q(W) − W‖_F / ‖W‖_F over the unit's columns


@dataclass(frozen=True, kw_only=True)
class ApplyReport:
    """What :func:`apply_plan` did: one entry per unit, the method and the time it took."""

    method: ApplyMethod
    units: Sequence[UnitApplied]
    seconds: float
    params: int
    size_bits: float
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return self.size_bits / self.params if self.params else 0.0


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A calibration batch without its targets (what ``model(**inputs)`` takes)."""
    return {k: v for k, v in batch.items() if k not in _NON_INPUT_KEYS}


def _default_forward(model: torch.nn.Module) -> Callable[[Mapping[str, Any]], Any]:
    def run(batch: Mapping[str, Any]) -> Any:
        inputs = model_inputs(batch)
        if getattr(getattr(model, "config", None), "is_decoder", False) or hasattr(model, "lm_head"):
            inputs.setdefault("use_cache", False)
        return model(**inputs)
    return run


def apply_plan(
    model: torch.nn.Module,
    plan: BitPlan,
    *,
    method: ApplyMethod | str = ApplyMethod.RTN,
    calibration: Sequence[Mapping[str, Any]] | None = None,
    units: Sequence[Unit] | None = None,
    table: CostTable | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    static_groups: bool = False,
    forward: Callable[[Mapping[str, Any]], Any] | None = None,
    progress: bool = False,
    on_hessian: Callable[[str, torch.Tensor], None] | None = None,
) -> ApplyReport:
    """Fake-quantize ``model`` in place as ``plan`` says.

    Args:
        method: ``rtn``, ``gptq`` (needs ``calibration`` batches of model inputs) or ``ggml``
            (the importance comes from ``calibration`` when given).
        units: the discovered units (gives the column range of group units ``m[g=i]``).
        table: when given, the plan must pass :func:`allocator.core.plan.check_plan` against it.
        blocksize, percdamp, static_groups: GPTQ settings (:class:`allocator.model.quant.gptq.GptqConfig`).
        forward: how to run a batch (default ``model(**batch)``), for GPTQ's activations.
        on_hessian: GPTQ only: called with each module's name and the input Hessian
            ``H = 2XXᵀ/n`` it is quantized with (inputs of the model whose earlier blocks are
            already quantized), before its weight changes.

    Raises:
        InvalidPlanError: unknown unit, option outside the catalogue or the table, bits or group
            size a format cannot hold, codebook GGUF types.
        BackendError: GPTQ on a non-Linear module or a non-positive-definite Hessian.
    """
    import torch

    try:
        how = ApplyMethod(method)
    except ValueError:
        raise InvalidParameterError(f"apply method {method!r} is unknown; choose rtn, gptq or ggml") from None
    if table is not None:
        problems = check_plan(plan, table)
        if problems:
            raise InvalidPlanError(f"plan does not fit the cost table: {problems[0]}")
    resolved = resolve_plan(model, plan, units)
    t0 = time.perf_counter()
    # each unit's error is measured as its columns are replaced: no copy of the original weights
    done: dict[str, UnitApplied] = {}
    info: dict[str, Any] = {}
    with torch.no_grad():
        if how is ApplyMethod.RTN:
            _apply_rtn(model, resolved, done)
        elif how is ApplyMethod.GGML:
            info = _apply_ggml(model, resolved, calibration or (), forward or _default_forward(model),
                               done)
        else:
            if not calibration:
                raise InvalidParameterError("GPTQ needs calibration batches; pass calibration=...")
            from allocator.model.quant.gptq import GptqConfig

            cfg = GptqConfig(blocksize=blocksize, percdamp=percdamp, static_groups=static_groups)
            info = _apply_gptq(model, resolved, calibration, cfg, forward or _default_forward(model),
                               progress, done, on_hessian)
    report = [done[u.name] for u in resolved]
    size = sum(u.fmt.size_bits(r.params, u.hi - u.lo) for u, r in zip(resolved, report, strict=True))
    return ApplyReport(method=how, units=report, seconds=time.perf_counter() - t0,
                       params=sum(r.params for r in report), size_bits=size, info=info)


def _weight2d(model: torch.nn.Module, module: str) -> torch.Tensor:
    w = module_weight(model, module)
    return w.reshape(w.shape[0], -1) if w.dim() > 2 else w


#: elements per row block of :func:`_applied`'s float64 sums (32 MiB each)
_NORM_BLOCK_ELEMENTS = 1 << 22


def _applied(original: torch.Tensor, q: torch.Tensor, u: ResolvedUnit) -> UnitApplied:
    """The unit's record: ``‖Q(W) − W‖_F / ‖W‖_F`` over its columns, summed in float64 row block
    by row block (a whole tied head in float64 would be several hundred MB per copy)."""
    o, q = original.detach(), q.detach()
    rows = max(1, _NORM_BLOCK_ELEMENTS // max(int(o[0].numel()) if o.dim() else 1, 1))
    err = ref = 0.0
    for r0 in range(0, int(o.shape[0]), rows):
        ob = o[r0:r0 + rows].double()
        ref += float((ob * ob).sum())
        err += float(((q[r0:r0 + rows].double() - ob) ** 2).sum())
    rel = (err / ref) ** 0.5 if ref > 0 else 0.0
    return UnitApplied(unit=u.name, option=u.fmt.name, params=int(o.numel()), rel_error=rel)


def _replace(view: torch.Tensor, q: torch.Tensor, u: ResolvedUnit, done: dict[str, UnitApplied]) -> None:
    """Write ``q`` into the unit's columns ``view``, its error recorded first."""
    done[u.name] = _applied(view, q, u)
    view.copy_(q)


def _apply_rtn(model: torch.nn.Module, resolved: Sequence[ResolvedUnit],
               done: dict[str, UnitApplied]) -> None:
    for u in resolved:
        view = _weight2d(model, u.module)[:, u.lo:u.hi]
        _replace(view, fake_quantize(view.detach(), u.fmt), u, done)


def _apply_ggml(model: torch.nn.Module, resolved: Sequence[ResolvedUnit],
                calibration: Sequence[Mapping[str, Any]],
                forward: Callable[[Mapping[str, Any]], Any],
                done: dict[str, UnitApplied]) -> dict[str, Any]:
    """ggml for GGUF options, RTN for the rest; the imatrix is taken before any weight changes."""
    from allocator.model.quant import collect_importance, ggml_values

    linear = [m for m in dict.fromkeys(u.module for u in resolved) if is_linear_like(model.get_submodule(m))]
    imp = collect_importance(model, linear, calibration, forward) if calibration else {}
    for u in resolved:
        view = _weight2d(model, u.module)[:, u.lo:u.hi]
        m = imp.get(u.module)
        _replace(view, ggml_values(view.detach(), u.fmt, None if m is None else m[u.lo:u.hi]), u, done)
    return {"importance": sorted(imp), "tokens": _tokens(calibration)}


def _apply_gptq(model: torch.nn.Module, resolved: Sequence[ResolvedUnit],
                calibration: Sequence[Mapping[str, Any]], cfg: Any,
                forward: Callable[[Mapping[str, Any]], Any], progress: bool,
                done: dict[str, UnitApplied],
                on_hessian: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    by_module: dict[str, list[ResolvedUnit]] = {}
    for u in resolved:
        by_module.setdefault(u.module, []).append(u)
    for name in by_module:
        if not is_linear_like(model.get_submodule(name)):
            raise BackendError(f"GPTQ handles Linear modules only; {name!r} is not one (use --method rtn)")
    order = [n for n, _ in model.named_modules() if n in by_module]
    stages = block_stages(order)
    losses: dict[str, float] = {}
    bar = tqdm(total=len(order), desc="gptq", disable=not progress, leave=False)
    for stage in stages:
        hess = collect_hessians(model, stage, calibration, forward)
        for name in stage:
            w = module_weight(model, name)
            if on_hessian is not None:
                on_hessian(name, hess[name].H)
            fmts = column_formats(int(w.shape[1]), [(u.lo, u.hi, u.fmt) for u in by_module[name]])
            q, loss = gptq_quantize(w.detach(), hess[name].H, fmts, cfg)
            for u in by_module[name]:
                done[u.name] = _applied(w[:, u.lo:u.hi], q[:, u.lo:u.hi], u)
            w.copy_(q)  # whole: columns outside the plan keep GPTQ's compensation
            losses[name] = loss
            bar.update(1)
    bar.close()
    return {"gptq_loss": losses, "stages": len(stages), "tokens": _tokens(calibration)}


def _tokens(batches: Sequence[Mapping[str, Any]]) -> int:
    n = 0
    for b in batches:
        m = b.get("attention_mask")
        n += int(m.sum()) if m is not None else int(b["input_ids"].numel()) if "input_ids" in b else 0
    return n
