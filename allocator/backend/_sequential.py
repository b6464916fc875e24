"""GPTQ apply block by block, for models whose weights do not fit in memory at once.

The model is read from its safetensors with :class:`allocator.model.sequential.SequentialModel`:
the non-block parts are loaded, each transformer block is loaded, quantized and released in turn.
Per block ``b`` with cached inputs ``X_b`` (the outputs of the *already quantized* blocks
``0..b−1``, as in the GPTQ reference's sequential driver):

* every planned Linear ``m`` of the block gets ``H_m = (2/n) Σ_t x_t x_tᵀ`` from one pass of the
  float block over ``X_b`` (padding rows skipped, as
  :func:`~allocator.model.quant.collect_hessians` does);
* all its planned linears are quantized with :func:`~allocator.model.quant.gptq_quantize` (per-unit formats);
* ``X_{b+1} = block_b^Q(X_b)`` is recomputed with the quantized weights.

The output head (the only planned module allowed outside the blocks) is quantized last from
``norm(X_B)``. This is what :func:`~._apply.apply_plan` with ``method="gptq"`` computes, since its
stages are the same blocks and each stage's Hessians come from a forward through the quantized
earlier stages; the sequential result equals it to float tolerance (bit for bit on the tiny LM,
``tests/backend/test_sequential_gptq.py``).

Peak parameter memory: non-block parameters + one block (reported as ``peak_params``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from allocator.backend._apply import ApplyMethod, ApplyReport, UnitApplied, _applied
from allocator.backend._resolve import ResolvedUnit, module_weight, resolve_plan
from allocator.core.errors import BackendError, InvalidParameterError, InvalidPlanError
from allocator.core.plan import BitPlan, check_plan
from allocator.core.units import is_linear_like
from allocator.model.quant.gptq import GptqConfig, collect_hessians, column_formats, gptq_quantize
from allocator.model.sequential import SequentialModel

if TYPE_CHECKING:
    import torch

    from allocator.core.table import CostTable
    from allocator.core.units import Unit
    from allocator.model.sequential import BlockStep, SequentialModel

__all__ = ["SequentialApplyResult", "apply_plan_sequential"]

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True, kw_only=True, eq=False)
class SequentialApplyResult:
    """What :func:`apply_plan_sequential` did.

    ``weights`` holds the quantized weight of every planned module (CPU tensors) when
    ``keep_weights`` was set; ``save_dir`` the written model directory when one was asked for.
    ``peak_params`` is the most parameters ever materialised at once, ``nonblock_params`` +
    ``max_block_params`` the bound it must stay within.
    """

    report: ApplyReport
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    save_dir: str | None = None
    peak_params: int
    nonblock_params: int
    max_block_params: int


def apply_plan_sequential(
    path: str | os.PathLike[str] | SequentialModel,
    plan: BitPlan,
    *,
    calibration: Sequence[Mapping[str, Any]],
    units: Sequence[Unit] | None = None,
    table: CostTable | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    static_groups: bool = False,
    dtype: Any = "float32",
    device: str = "cpu",
    save_dir: str | os.PathLike[str] | None = None,
    keep_weights: bool = False,
) -> SequentialApplyResult:
    """GPTQ-quantize the model in directory ``path`` as ``plan`` says, one block in memory at a time.

    Args:
        path: the model directory (or bundled name), or a fresh :class:`SequentialModel` of it
            (no block run yet; its non-block weights are quantized in place).
        calibration: batches of model inputs (``input_ids``, ``attention_mask``); their
            activations at one block's input are cached for all batches.
        units, table, blocksize, percdamp, static_groups: as in :func:`~._apply.apply_plan`.
        dtype, device: the dtype and device weights are loaded into and quantized in.
        save_dir: write the quantized model there (one safetensors shard per block, one for the
            rest, an index and the config / tokenizer files), loadable with ``from_pretrained``.
        keep_weights: also return every quantized module weight (costs their memory).

    Raises:
        InvalidParameterError: no calibration, or neither ``save_dir`` nor ``keep_weights``.
        InvalidPlanError: the plan does not fit the model or the table.
        BackendError: a planned module is not a Linear of a block or the output head.
    """
    if not calibration:
        raise InvalidParameterError("sequential GPTQ needs calibration batches; pass calibration=...")
    if save_dir is None and not keep_weights:
        raise InvalidParameterError("sequential GPTQ would discard its result; pass save_dir=... "
                                    "or keep_weights=True")
    if table is not None:
        problems = check_plan(plan, table)
        if problems:
            raise InvalidPlanError(f"plan does not fit the cost table: {problems[0]}")
    cfg = GptqConfig(blocksize=blocksize, percdamp=percdamp, static_groups=static_groups)
    t0 = time.perf_counter()
    seq = path if isinstance(path, SequentialModel) else SequentialModel(path, dtype=dtype, device=device)
    model = seq.model
    resolved = resolve_plan(model, plan, units)
    by_module: dict[str, list[ResolvedUnit]] = {}
    for u in resolved:
        by_module.setdefault(u.module, []).append(u)
    head_name = seq.head_name
    in_block: dict[int, list[str]] = {}
    tail: list[str] = []
    for name, _ in model.named_modules():
        if name not in by_module:
            continue
        if not is_linear_like(model.get_submodule(name)):
            raise BackendError(f"GPTQ handles Linear modules only; {name!r} is not one (use --method rtn)")
        idx = _block_index(name, seq.block_names)
        if idx is not None:
            in_block.setdefault(idx, []).append(name)
        elif name == head_name:
            tail.append(name)
        else:
            raise BackendError(f"sequential GPTQ quantizes block linears and the output head only; "
                               f"{name!r} is neither (apply it without sequential mode)")
    out_dir = Path(save_dir) if save_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    kept: dict[str, torch.Tensor] = {}
    reports: dict[str, UnitApplied] = {}
    losses: dict[str, float] = {}
    max_block = 0
    for step in seq.steps(calibration):
        max_block = max(max_block, sum(p.numel() for p in step.module.parameters()))
        names = in_block.get(step.index, [])
        prefix = f"{step.name}."
        if names:
            # collect_hessians masks padding with each "batch"'s attention_mask: hand it the
            # cached token masks, and a forward that runs the block on batch i's cached inputs
            views = [{"attention_mask": inp.token_mask, "index": i} for i, inp in enumerate(step.inputs)]
            hess = collect_hessians(step.module, [n[len(prefix):] for n in names], views,
                                    _runner(step))
            for name in names:
                rel = name[len(prefix):]
                _quantize_module(step.module, rel, name, by_module[name], hess[rel].H, cfg, losses,
                                 reports)
        _collect(step.module, prefix, names, out_dir, f"block-{step.index:05d}", weight_map, kept,
                 keep_weights)
    for name in tail:
        from allocator.model.quant.gptq import HessianAccumulator

        w = module_weight(model, name)
        acc = HessianAccumulator(int(w.shape[1]), device=w.device)
        for x, inp in zip(seq.head_inputs(), seq.final_inputs, strict=True):
            mask = inp.token_mask
            real = mask is not None and tuple(mask.shape) == tuple(x.shape[:2])
            acc.add_batch(x[mask.bool()] if real and mask is not None else x)
        _quantize_module(model, name, name, by_module[name], acc.H, cfg, losses, reports)
    _collect(model, "", tail, out_dir, "rest", weight_map, kept, keep_weights,
             skip=f"{seq.blocks_name}.")
    if out_dir is not None:
        _write_index(seq.path, out_dir, weight_map)
    units_out = [reports[u.name] for u in resolved]
    size = sum(u.fmt.size_bits(r.params, u.hi - u.lo) for u, r in zip(resolved, units_out, strict=True))
    tokens = sum(int(i.token_mask.sum()) if i.token_mask is not None else int(i.hidden.shape[:-1].numel())
                 for i in seq.final_inputs)
    report = ApplyReport(method=ApplyMethod.GPTQ, units=units_out, seconds=time.perf_counter() - t0,
                         params=sum(r.params for r in units_out), size_bits=size,
                         info={"gptq_loss": losses, "stages": len(in_block) + bool(tail),
                               "tokens": tokens, "sequential": True, "peak_params": seq.peak_params})
    return SequentialApplyResult(report=report, weights=kept,
                                 save_dir=str(out_dir) if out_dir is not None else None,
                                 peak_params=seq.peak_params, nonblock_params=seq.nonblock_params,
                                 max_block_params=max_block)


def _runner(step: BlockStep) -> Callable[[Mapping[str, Any]], Any]:
    def run(view: Mapping[str, Any]) -> Any:
        return step.run(int(view["index"]))
    return run


def _block_index(name: str, block_names: Sequence[str]) -> int | None:
    for i, b in enumerate(block_names):
        if name.startswith(f"{b}."):
            return i
    return None


def _quantize_module(root: torch.nn.Module, rel: str, name: str, units: Sequence[ResolvedUnit],
                     H: torch.Tensor, cfg: Any, losses: dict[str, float],
                     reports: dict[str, UnitApplied]) -> None:
    """GPTQ one module in place and record each of its units' report (against the float weight)."""
    import torch

    w = module_weight(root, rel)
    fmts = column_formats(int(w.shape[1]), [(u.lo, u.hi, u.fmt) for u in units])
    q, loss = gptq_quantize(w.detach(), H, fmts, cfg)
    for u in units:
        reports[u.name] = _applied(w[:, u.lo:u.hi], q[:, u.lo:u.hi], u)
    with torch.no_grad():
        w.copy_(q)
    losses[name] = loss


def _collect(root: torch.nn.Module, prefix: str, quantized: Sequence[str], out_dir: Path | None,
             shard: str, weight_map: dict[str, str], kept: dict[str, torch.Tensor], keep: bool,
             *, skip: str | None = None) -> None:
    """Keep the quantized weights and / or write ``root``'s tensors as one safetensors shard."""
    for name in quantized:
        if keep:
            # as stored (Conv1D: [in, out]), so it compares with the model's own state dict
            stored = cast("torch.Tensor", root.get_submodule(name[len(prefix):]).weight)
            kept[name] = stored.detach().to("cpu").clone()
    if out_dir is None:
        return
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in root.state_dict(keep_vars=True).items():
        full = f"{prefix}{key}"
        if skip is not None and full.startswith(skip) or t.device.type == "meta":
            continue
        if id(t) in seen:  # a tied tensor is written once, under its first name
            continue
        seen.add(id(t))
        tensors[full] = t.detach().to("cpu").contiguous()
    file = f"model-{shard}.safetensors"
    save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, file))


def _write_index(src: Path, out_dir: Path, weight_map: dict[str, str]) -> None:
    """The sharded-checkpoint index and the non-weight files ``from_pretrained`` needs."""
    total = sum((out_dir / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    for name in _COPIED:
        if (src / name).is_file() and src.resolve() != out_dir.resolve():
            shutil.copyfile(src / name, out_dir / name)
