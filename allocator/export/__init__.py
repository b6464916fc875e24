"""Export a :class:`~allocator.core.plan.BitPlan` to the config format of a quantization tool.

Targets (``EXPORTERS``): ``gptqmodel`` (``QuantizeConfig.dynamic``), ``llmcompressor``
(recipe with ``config_groups``), ``autoround`` (``layer_config``), ``hqq`` (per-tag
``dynamic_config``), ``llamacpp`` (``llama-quantize --tensor-type-file``) and ``torchao``
(``FqnToConfig``); :func:`write_gguf` writes the quantized model itself as a llama.cpp GGUF file and
:func:`llamacpp_preset_plan` gives ``llama-quantize``'s presets as plans. Formats and matching
rules follow ``shared/reference/export-formats.md``; user documentation is ``docs/exports.md``.

Every export either expresses the plan exactly or raises :class:`~allocator.core.errors.ExportError`
naming what the target cannot hold. ``lossy=True`` allows the documented fallbacks only (raise
modules that must share a setting to the highest one; map GGUF/int options to the nearest richer
type) and lists every changed unit in :attr:`ExportResult.changed` and the notes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from allocator.core.atomic import atomic_write_text
from allocator.core.errors import ExportError, UnknownNameError
from allocator.core.plan import BitPlan
from allocator.export._exporter import ExportContext, Exporter, ExportResult, module_of
from allocator.export._grouping import fused_name
from allocator.export._model import ModelInfo, model_info
from allocator.export._settings import Setting, gguf_setting, int_setting, skip_setting
from allocator.export.gguf_writer import GgufFile, write_gguf
from allocator.export.llamacpp_presets import PRESETS as LLAMACPP_PRESETS
from allocator.export.llamacpp_presets import llamacpp_preset_plan

__all__ = ["EXPORTERS", "LLAMACPP_PRESETS", "ExportResult", "Exporter", "GgufFile", "ModelInfo", "Setting",
           "export_plan", "fused_name", "get_exporter", "gguf_setting", "int_setting",
           "llamacpp_preset_plan", "model_info", "module_of", "skip_setting", "write_export",
           "write_gguf", "write_result"]


#: target name → module defining ``EXPORTER`` (imported on use).
EXPORTERS: dict[str, str] = {
    "gptqmodel": "allocator.export.gptqmodel",
    "llmcompressor": "allocator.export.llmcompressor",
    "autoround": "allocator.export.autoround",
    "hqq": "allocator.export.hqq",
    "llamacpp": "allocator.export.llamacpp",
    "torchao": "allocator.export.torchao",
}


def get_exporter(target: str) -> Exporter:
    if target not in EXPORTERS:
        raise UnknownNameError(f"unknown export target {target!r}; choose one of {', '.join(EXPORTERS)}")
    exporter: Exporter = importlib.import_module(EXPORTERS[target]).EXPORTER
    return exporter


def export_plan(
    plan: BitPlan,
    target: str,
    *,
    model_names: Iterable[str] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    lossy: bool = False,
    base: str | None = None,
    arch: str | None = None,
) -> ExportResult:
    """Express ``plan`` in ``target``'s format.

    Args:
        model_names: names of the model's modules. With them, plan units that are not modules
            are refused, fused siblings outside the plan are checked, and targets with a global
            default (GPTQModel, AutoRound) pin unplanned weight modules to "not quantized".
        shapes: module → weight shape, for the target's bpw accounting and divisibility checks.
        lossy: allow the documented fallbacks instead of refusing (each change is reported).
        base: the target's base setting (GPTQModel: the top-level option; llama.cpp: the
            ``ftype`` of the command line). Other targets take none.
        arch: the model family (HF ``model_type``) for GGUF tensor names; guessed from the
            names when omitted (llama-style → llama table, ``encoder.layer.*`` → bert).

    Raises:
        UnknownNameError: unknown target.
        ExportError: the target cannot express the plan (one line naming the unit and the fix).
    """
    exporter = get_exporter(target)
    if base is not None and exporter.BASE_HELP is None:
        raise ExportError(f"{target}: takes no base setting (got {base!r}); drop --base")
    if not plan.assignments:
        raise ExportError(f"{target}: the plan has no units; nothing to export")
    ctx = ExportContext(plan=plan, target=target, lossy=lossy,
                        model_names=frozenset(model_names) if model_names is not None else None,
                        shapes=dict(shapes or {}), arch=arch)
    return exporter.export(ctx, base)


def write_result(result: ExportResult, path: str | Path) -> list[Path]:
    """Write ``result.text`` to ``path`` and each companion file next to it (``plan.py`` →
    ``plan.json``); returns every path written."""
    p = Path(path)
    written = [atomic_write_text(p, result.text)]  # a failed write never leaves half a config
    for suffix, text in result.files.items():
        q = p.with_suffix(suffix)
        if q == p:
            q = p.with_name(p.name + suffix)
        written.append(atomic_write_text(q, text))
    return written


def write_export(plan: BitPlan, target: str, path: str | Path, **kw: Any) -> list[Path]:
    """:func:`export_plan` then :func:`write_result`; ``kw`` as for :func:`export_plan`."""
    return write_result(export_plan(plan, target, **kw), path)
