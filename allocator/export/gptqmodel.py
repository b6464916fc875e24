"""GPTQModel ``QuantizeConfig`` with a ``dynamic`` map of anchored per-module regexes.

Consumer rule (``gptqmodel/quantization/config.py``): keys ``+:regex`` (override) and ``-:regex``
(skip), negatives moved first, ``pcre.match`` (start-anchored only, so every key ends in ``$``),
first match wins; unmatched layer modules take the top-level setting. vLLM reads the same map
with ``re.match`` on its *fused* prefixes (``…self_attn.qkv_proj``, ``…mlp.gate_up_proj``), so
fused names are in the alternation and q/k/v, gate/up must share one setting.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from allocator.core.errors import UnknownNameError
from allocator.core.formats import parse_format
from allocator.export._exporter import ExportContext, ExportResult
from allocator.export._grouping import enforce_fusion, fusion_groups, module_settings
from allocator.export._patterns import anchored_patterns
from allocator.export._report import needs_shape, plan_header, weighted_bpw
from allocator.export._settings import Setting, group_by_setting, int_of

__all__ = ["EXPORTER", "GptqModelExporter", "gptq_bpw"]


def gptq_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """GPTQ checkpoint: b + (16 + b)/g + 32/out (fp16 scales, b-bit packed zeros, int32 g_idx)."""
    if s.skip:
        return 16.0
    b = float(s.bits or 0)
    if shape is None:
        if s.group_size == -1:
            needs_shape(shape)
        return b + (16.0 + b) / float(s.group_size or 1)
    out_f, in_f = shape
    g = float(in_f if s.group_size == -1 else s.group_size or in_f)
    return b + (16.0 + b) / g + 32.0 / out_f


def fused_leaves(names: list[str]) -> dict[str, list[str]]:
    """parent → fused leaf names whose members are all in ``names`` (vLLM prefixes)."""
    extra: dict[str, list[str]] = {}
    for fused in fusion_groups(names):
        parent, _, leaf = fused.rpartition(".")
        extra.setdefault(parent, []).append(leaf)
    return extra


class GptqModelExporter:
    NAME = "gptqmodel"
    SUFFIX = ".json"
    BASE_HELP = "top-level option of QuantizeConfig (default: the plan's most common setting)"

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings = module_settings(ctx, lambda u, f: int_of(ctx, u, f))
        settings = enforce_fusion(ctx, settings)
        top = self._base(ctx, settings, base)
        unplanned = sorted((ctx.model_names or frozenset()) - set(settings))
        entries: list[tuple[str, dict[str, Any]]] = []
        negatives = [n for n, s in settings.items() if s.skip] + unplanned
        if negatives:
            for pat in anchored_patterns(negatives, extra_leaves=fused_leaves(negatives)):
                entries.append((f"-:{pat}", {}))
        for s, names in group_by_setting({n: s for n, s in settings.items() if not s.skip}):
            for pat in anchored_patterns(names, extra_leaves=fused_leaves(names)):
                entries.append((f"+:{pat}", {"bits": s.bits, "group_size": s.group_size,
                                             "sym": bool(s.symmetric)}))
        used_bits = {s.bits for s in settings.values() if not s.skip} | {top.bits}
        fmt = "gptq_p" if used_bits & {5, 6, 7} else "gptq"
        lm_head = any(n == "lm_head" or n.endswith(".lm_head") for n, s in settings.items() if not s.skip)
        notes = plan_header(ctx, "GPTQ checkpoint b + (16 + b)/g + 32/out: "
                            + weighted_bpw(ctx, settings, gptq_bpw))
        notes.append(f"top-level setting {top.label}; {len(entries)} dynamic rule(s), negatives first")
        if fmt == "gptq_p":
            notes.append("5/6/7-bit settings switch GPTQModel to format 'gptq_p' (planar), which only "
                         "GPTQModel loads; vLLM/HF cannot read it")
        if ctx.model_names is None:
            notes.append("without the model's module names, layer modules not in the plan take the "
                         "top-level setting; pass --model to pin them to fp16 with '-:' rules")
        notes.extend(ctx.notes)
        doc: dict[str, Any] = {
            "bits": top.bits, "group_size": top.group_size, "sym": bool(top.symmetric),
            "desc_act": False, "lm_head": lm_head, "format": fmt,
            "dynamic": dict(entries),
            "meta": {"bitalloc": {"plan_bpw": ctx.plan.summary.bpw, "notes": notes}},
        }
        return ExportResult(target=self.NAME, text=json.dumps(doc, indent=2) + "\n", suffix=self.SUFFIX,
                            notes=tuple(notes), changed=dict(ctx.changed))

    @staticmethod
    def _base(ctx: ExportContext, settings: dict[str, Setting], base: str | None) -> Setting:
        if base is not None:
            try:
                s = int_of(ctx, "--base", parse_format(base))
            except UnknownNameError as exc:
                raise ctx.fail(f"base {base!r}: {exc}") from None
            if s.skip:
                raise ctx.fail(f"base {base!r} is unquantized; GPTQModel needs a quantized top-level "
                               "setting (e.g. int4-g128-sym)")
            return s
        weight = Counter[Any]()
        by_key: dict[Any, Setting] = {}
        for n, s in settings.items():
            if not s.skip:
                weight[s.key] += ctx.params(n) or 1
                by_key[s.key] = s
        if not weight:
            return int_of(ctx, "--base", parse_format("int4-g128-sym"))
        return by_key[weight.most_common(1)[0][0]]


EXPORTER = GptqModelExporter()
