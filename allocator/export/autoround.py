"""AutoRound ``layer_config`` (JSON): exact full module names only.

Consumer rule (``resolver.py`` + ``utils/common.py::to_standard_regex``): a key equal to a
supported layer's full name is used as-is; any other key becomes a substring/regex that expands
in dict order and *overwrites* earlier entries, so only exact names are emitted. Values use the
``QuantizationScheme`` fields (``bits``, ``group_size``, ``sym``, ``data_type``); unquantized is
``bits: 16`` as ``ignore_layers`` writes it. Layers without a key take the global ``scheme``.
"""

from __future__ import annotations

import json
from typing import Any

from allocator.export._exporter import ExportContext, ExportResult
from allocator.export._grouping import enforce_fusion, module_settings
from allocator.export._report import needs_shape, plan_header, weighted_bpw
from allocator.export._settings import Setting, int_of

__all__ = ["EXPORTER", "AutoRoundExporter", "autoround_bpw", "layer_value"]

#: what ``ignore_layers`` writes for a layer kept in 16 bits
SKIP_VALUE: dict[str, Any] = {"bits": 16, "act_bits": 16, "data_type": "float"}


def autoround_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """AutoScheme ``compute_layer_bits`` for int: b + (16 + b)/g (zero counted even if sym)."""
    if s.skip:
        return 16.0
    b = float(s.bits or 0)
    g = float(needs_shape(shape)[1] if s.group_size == -1 else s.group_size or 1)
    return b + (16.0 + b) / g


def layer_value(s: Setting) -> dict[str, Any]:
    if s.skip:
        return dict(SKIP_VALUE)
    return {"bits": s.bits, "group_size": s.group_size, "sym": bool(s.symmetric), "data_type": "int"}


class AutoRoundExporter:
    NAME = "autoround"
    SUFFIX = ".json"
    BASE_HELP = None

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings = module_settings(ctx, lambda u, f: int_of(ctx, u, f))
        settings = enforce_fusion(ctx, settings)
        config = {n: layer_value(settings[n]) for n in sorted(settings)}
        unplanned = sorted((ctx.model_names or frozenset()) - set(settings))
        for n in unplanned:
            config[n] = dict(SKIP_VALUE)
        notes = plan_header(ctx, "AutoScheme b + (16 + b)/g: " + weighted_bpw(ctx, settings, autoround_bpw))
        notes.append(f"{len(config)} exact layer names; use AutoRound(model, layer_config=json.load(f))")
        if ctx.model_names is None:
            notes.append("without the model's module names, layers not in the plan take the global "
                         "scheme; pass --model to pin them to 16 bits")
        notes.extend(ctx.notes)
        return ExportResult(target=self.NAME, text=json.dumps(config, indent=1) + "\n",
                            suffix=self.SUFFIX, notes=tuple(notes), changed=dict(ctx.changed))


EXPORTER = AutoRoundExporter()
