"""torchao ``FqnToConfig``: a Python snippet plus a JSON description, exact module FQNs only.

Consumer rule (``torchao/quantization/quant_api.py``): exact parameter FQN > exact module FQN >
``re:`` on a parameter FQN > ``re:`` on a module FQN (``re.fullmatch``, first in insertion order)
> ``_default``; a ``None`` value skips the module. Keys here are exact module FQNs, so precedence
never comes into play, and modules without a key are left alone — which requires
``quantize_(model, config, filter_fn=None)`` (the default filter makes FqnToConfig raise).

Two configs, chosen per setting by what torchao stores (``docs/exports.md``):

* ``int4-g{32,64,128,256}-asym`` → ``Int4WeightOnlyConfig(group_size=g)``: 4-bit codes packed
  two per byte, a bf16 scale and a bf16 zero per group of ``g`` input columns, i.e.
  ``4 + 32/g`` bits per weight (bitalloc's own asymmetric accounting). torchao offers int4 only
  asymmetric (TINYGEMM / HQQ qparams) and only at these four group sizes; the weights must be
  bfloat16.
* every other integer setting → ``IntxWeightOnlyConfig`` (int1–int8, ``PerGroup``/``PerAxis``,
  symmetric/asymmetric): the exact grid of the plan, but its default layout
  (``UNPACKED_TO_INT8``) keeps each code in an int8, so it costs ``8 + 16/g`` (+16/g asym)
  whatever the bit width.
"""

from __future__ import annotations

import json
from typing import Any

from allocator.export._exporter import ExportContext, ExportResult
from allocator.export._grouping import enforce_fusion, module_settings
from allocator.export._report import needs_shape, plan_header, weighted_bpw
from allocator.export._settings import Setting, group_by_setting, int_of

__all__ = ["EXPORTER", "INT4_GROUP_SIZES", "TorchaoExporter", "config_description", "int4_packed",
           "intx_unpacked_bpw", "torchao_bpw"]

#: the group sizes ``Int4WeightOnlyConfig`` accepts (its docstring: "choices are [256, 128, 64, 32]")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_packed(s: Setting) -> bool:
    """Whether ``s`` is stored by ``Int4WeightOnlyConfig`` (packed int4, asymmetric, a group
    size it accepts) rather than by the unpacked ``IntxWeightOnlyConfig``."""
    return (not s.skip and s.bits == 4 and s.symmetric is False
            and s.group_size in INT4_GROUP_SIZES)


def intx_unpacked_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """IntxWeightOnly default layout: 8 (unpacked int8) + 16/g scale (+ 16/g zero if asym)."""
    if s.skip:
        return 16.0
    g = float(needs_shape(shape)[1] if s.group_size == -1 else s.group_size or 1)
    return 8.0 + (16.0 if s.symmetric else 32.0) / g


def torchao_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """torchao's bits per weight of setting ``s``: ``4 + 32/g`` for packed int4 (bf16 scale and
    zero per group), else :func:`intx_unpacked_bpw`."""
    if int4_packed(s):
        return 4.0 + 32.0 / float(s.group_size or 1)
    return intx_unpacked_bpw(s, shape)


def config_description(s: Setting) -> dict[str, Any] | None:
    if s.skip:
        return None
    if int4_packed(s):
        return {"config": "Int4WeightOnlyConfig", "group_size": int(s.group_size or 0)}
    gran: dict[str, int] = {"PerAxis": 0} if s.group_size == -1 else {"PerGroup": int(s.group_size or 0)}
    return {"config": "IntxWeightOnlyConfig", "weight_dtype": f"int{s.bits}", "granularity": gran,
            "mapping_type": "SYMMETRIC" if s.symmetric else "ASYMMETRIC"}


def _config_expr(s: Setting) -> str:
    if int4_packed(s):
        return f"Int4WeightOnlyConfig(group_size={s.group_size})"
    gran = "PerAxis(0)" if s.group_size == -1 else f"PerGroup({s.group_size})"
    mapping = "SYMMETRIC" if s.symmetric else "ASYMMETRIC"
    return (f"IntxWeightOnlyConfig(weight_dtype=torch.int{s.bits}, granularity={gran}, "
            f"mapping_type=MappingType.{mapping})")


def _imports(quantized: list[Setting]) -> list[str]:
    """Only the names the snippet uses, so a torchao without one of them fails on use only."""
    names = {"FqnToConfig", "quantize_"}
    if any(int4_packed(s) for s in quantized):
        names.add("Int4WeightOnlyConfig")
    intx = [s for s in quantized if not int4_packed(s)]
    if intx:
        names |= {"IntxWeightOnlyConfig", "MappingType"}
        names |= {"PerAxis" if s.group_size == -1 else "PerGroup" for s in intx}
    return ["from torchao.quantization import (", *(f"    {n}," for n in sorted(names)), ")"]


class TorchaoExporter:
    NAME = "torchao"
    SUFFIX = ".py"
    BASE_HELP = None

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings = module_settings(ctx, lambda u, f: int_of(ctx, u, f))
        settings = enforce_fusion(ctx, settings)
        for n, s in sorted(settings.items()):
            in_f = ctx.in_features(n)
            # Int4WeightOnlyConfig would skip such a weight silently, IntxWeightOnlyConfig raise
            if not s.skip and s.group_size not in (-1, None) and in_f and in_f % int(s.group_size or 1):
                raise ctx.fail(f"{n!r} has {in_f} input features, not a multiple of group size "
                               f"{s.group_size}; torchao cannot group it (choose a dividing group)")
        quantized = [s for s in settings.values() if not s.skip]
        notes = plan_header(ctx, "Int4WeightOnly packed int4 4 + 32/g; IntxWeightOnly unpacked "
                            "int8 8 + 16/g (+16/g asym): "
                            + weighted_bpw(ctx, settings, torchao_bpw)
                            + "; the Intx default layout stores sub-8-bit weights in int8")
        notes.append("apply with quantize_(model, config, filter_fn=None): the default filter_fn "
                     "makes FqnToConfig raise; modules without a key are not quantized")
        if any(int4_packed(s) for s in quantized):
            notes.append("Int4WeightOnlyConfig needs bfloat16 weights (model.to(torch.bfloat16)); "
                         "its int4_packing_format (default plain; tile_packed_to_4d for tinygemm on "
                         "CUDA, opaque on CPU) changes the kernel, not the 4 + 32/g storage")
        notes.extend(ctx.notes)
        desc = {n: config_description(settings[n]) for n in sorted(settings)}
        names: dict[tuple[Any, ...], str] = {}
        lines = [f"# {n}" for n in notes]
        lines += ["import torch", *_imports(quantized), ""]
        for i, (s, _) in enumerate(group_by_setting({n: s for n, s in settings.items() if not s.skip})):
            names[s.key] = f"cfg_{i}"
            lines.append(f"cfg_{i} = {_config_expr(s)}  # {s.label}")
        lines += ["", "config = FqnToConfig({"]
        for n in sorted(settings):
            s = settings[n]
            lines.append(f"    {n!r}: {'None' if s.skip else names[s.key]},")
        lines += ["})", "", "", "def apply(model: torch.nn.Module) -> None:",
                  "    quantize_(model, config, filter_fn=None)", ""]
        doc = {"fqn_to_config": desc, "quantize_kwargs": {"filter_fn": None}, "notes": notes}
        return ExportResult(target=self.NAME, text="\n".join(lines), suffix=self.SUFFIX,
                            files={".json": json.dumps(doc, indent=1) + "\n"}, notes=tuple(notes),
                            changed=dict(ctx.changed))


EXPORTER = TorchaoExporter()
