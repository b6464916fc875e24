"""torchao ``FqnToConfig``: a Python snippet plus a JSON description, exact module FQNs only.

Consumer rule (``torchao/quantization/quant_api.py``): exact parameter FQN > exact module FQN >
``re:`` on a parameter FQN > ``re:`` on a module FQN (``re.fullmatch``, first in insertion order)
> ``_default``; a ``None`` value skips the module. Keys here are exact module FQNs, so precedence
never comes into play, and modules without a key are left alone — which requires
``quantize_(model, config, filter_fn=None)`` (the default filter makes FqnToConfig raise).
Every integer setting is an ``IntxWeightOnlyConfig`` (int1–int8, ``PerGroup``/``PerAxis``,
symmetric/asymmetric): the exact grid of the plan.
"""

from __future__ import annotations

import json
from typing import Any

from allocator.export import ExportResult
from allocator.export._common import (
    ExportContext,
    Setting,
    enforce_fusion,
    group_by_setting,
    int_of,
    module_settings,
    needs_shape,
    plan_header,
    weighted_bpw,
)

__all__ = ["EXPORTER", "TorchaoExporter", "config_description", "intx_unpacked_bpw"]


def intx_unpacked_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """IntxWeightOnly default layout: 8 (unpacked int8) + 16/g scale (+ 16/g zero if asym)."""
    if s.skip:
        return 16.0
    g = float(needs_shape(shape)[1] if s.group_size == -1 else s.group_size or 1)
    return 8.0 + (16.0 if s.symmetric else 32.0) / g


def config_description(s: Setting) -> dict[str, Any] | None:
    if s.skip:
        return None
    gran: dict[str, int] = {"PerAxis": 0} if s.group_size == -1 else {"PerGroup": int(s.group_size or 0)}
    return {"config": "IntxWeightOnlyConfig", "weight_dtype": f"int{s.bits}", "granularity": gran,
            "mapping_type": "SYMMETRIC" if s.symmetric else "ASYMMETRIC"}


def _config_expr(s: Setting) -> str:
    gran = "PerAxis(0)" if s.group_size == -1 else f"PerGroup({s.group_size})"
    mapping = "SYMMETRIC" if s.symmetric else "ASYMMETRIC"
    return (f"IntxWeightOnlyConfig(weight_dtype=torch.int{s.bits}, granularity={gran}, "
            f"mapping_type=MappingType.{mapping})")


class TorchaoExporter:
    NAME = "torchao"
    SUFFIX = ".py"
    BASE_HELP = None

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings = module_settings(ctx, lambda u, f: int_of(ctx, u, f))
        settings = enforce_fusion(ctx, settings)
        for n, s in sorted(settings.items()):
            in_f = ctx.in_features(n)
            if not s.skip and s.group_size not in (-1, None) and in_f and in_f % int(s.group_size or 1):
                raise ctx.fail(f"{n!r} has {in_f} input features, not a multiple of group size "
                               f"{s.group_size}; torchao cannot group it (choose a dividing group)")
        notes = plan_header(ctx, "IntxWeightOnly unpacked int8 8 + 16/g (+16/g asym): "
                            + weighted_bpw(ctx, settings, intx_unpacked_bpw)
                            + "; the default layout stores sub-8-bit weights in int8")
        notes.append("apply with quantize_(model, config, filter_fn=None): the default filter_fn "
                     "makes FqnToConfig raise; modules without a key are not quantized")
        notes.extend(ctx.notes)
        desc = {n: config_description(settings[n]) for n in sorted(settings)}
        names: dict[tuple[Any, ...], str] = {}
        lines = [f"# {n}" for n in notes]
        lines += ["import torch", "from torchao.quantization import (", "    FqnToConfig,",
                  "    IntxWeightOnlyConfig,", "    MappingType,", "    PerAxis,", "    PerGroup,",
                  "    quantize_,", ")", ""]
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
