"""HQQ / HF ``HqqConfig(dynamic_config=...)``: one setting per *linear tag*.

Consumer rule (``hqq/models/base.py``): ``name_to_linear_tag`` drops the path components
``model``, ``layers`` and every numeric one (``model.layers.3.self_attn.q_proj`` →
``self_attn.q_proj``); when any key is a tag, tags without a key are not quantized. So HQQ
holds one setting per projection type: a plan that differs across layer indices is refused
(lossy: each tag raised to its highest setting). HQQ always stores a zero point (asymmetric);
``nbits`` ∈ {1, 2, 3, 4, 5, 6, 8}; ``group_size`` a multiple of 8, or None for per channel.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from allocator.core.formats import QuantFormat
from allocator.export._exporter import ExportContext, ExportResult
from allocator.export._grouping import merge_groups, module_settings
from allocator.export._report import needs_shape, plan_header, weighted_bpw
from allocator.export._settings import Setting, int_of, int_setting

__all__ = ["EXPORTER", "HQQ_BITS", "HqqExporter", "hqq_bpw", "name_to_linear_tag"]

#: ``Quantizer.SUPPORTED_BITS`` without the ternary 1.58
HQQ_BITS = frozenset({1, 2, 3, 4, 5, 6, 8})
#: bits each nbits occupies once packed (5/6 are stored in 8, 3 as ``3bit_32`` = 3.2)
_STORED = {1: 1.0, 2: 2.0, 3: 3.2, 4: 4.0, 5: 8.0, 6: 8.0, 8: 8.0}


def name_to_linear_tag(name: str) -> str:
    """HQQ's tag of a module name (same rule as ``hqq.models.base.name_to_linear_tag``)."""
    return ".".join(n for n in name.split(".") if n not in ("model", "layers") and not n.isnumeric())


def hqq_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """Packed nbits (5/6 → 8, 3 → 3.2) + 32/g (scale and zero in the compute dtype)."""
    if s.skip:
        return 16.0
    g = float(needs_shape(shape)[1] if s.group_size == -1 else s.group_size or 1)
    return _STORED[int(s.bits or 8)] + 32.0 / g


def _convert(ctx: ExportContext, unit: str, fmt: QuantFormat) -> Setting:
    s = int_of(ctx, unit, fmt)
    if s.skip:
        return s
    bits, g, sym = int(s.bits or 0), int(s.group_size or -1), bool(s.symmetric)
    problems = []
    if bits not in HQQ_BITS:
        problems.append(f"{bits} bits (HQQ holds {sorted(HQQ_BITS)})")
    if g != -1 and g % 8:
        problems.append(f"group size {g} (HQQ needs a multiple of 8)")
    if sym:
        problems.append("a symmetric grid (HQQ always stores a zero point)")
    if not problems:
        return s
    if not ctx.lossy or g % 8 and g != -1:
        raise ctx.fail(f"unit {unit!r} ({fmt.name}) needs {' and '.join(problems)}",
                       lossy_hint=(g == -1 or g % 8 == 0) and "use the next HQQ bits, asymmetric")
    new = int_setting(min(b for b in HQQ_BITS if b >= bits), g, False)
    ctx.changed[unit] = (fmt.name, new.label)
    return new


class HqqExporter:
    NAME = "hqq"
    SUFFIX = ".json"
    BASE_HELP = None

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings = module_settings(ctx, lambda u, f: _convert(ctx, u, f))
        heads = sorted(n for n, s in settings.items() if not s.skip and n.split(".")[-1] == "lm_head")
        if heads:
            raise ctx.fail(f"unit {heads[0]!r} is quantized, but HQQ never quantizes lm_head (its "
                           "linear tags skip it); plan it as fp16")
        names = set(settings) | (ctx.model_names or frozenset())
        tags: dict[str, list[str]] = defaultdict(list)
        for n in sorted(names):
            tags[name_to_linear_tag(n)].append(n)
        planned_tags = {name_to_linear_tag(n) for n in settings}
        settings = merge_groups(ctx, settings, {t: ms for t, ms in tags.items() if t in planned_tags},
                                "HQQ sets one setting per linear tag; tag")
        per_tag: dict[str, dict[str, Any]] = {}
        for n, s in sorted(settings.items()):
            if not s.skip:
                per_tag[name_to_linear_tag(n)] = {
                    "nbits": s.bits, "group_size": None if s.group_size == -1 else s.group_size}
        if not per_tag:
            raise ctx.fail("every unit of the plan is unquantized; there is nothing to quantize")
        notes = plan_header(ctx, "packed nbits (5/6 stored as 8, 3 as 3.2) + 32/g: "
                            + weighted_bpw(ctx, settings, hqq_bpw))
        notes.append(f"{len(per_tag)} tag(s); tags without a key (fp16 units) are not quantized. "
                     "HF: HqqConfig(dynamic_config=json.load(f)); hqq: quantize_model(model, "
                     "{tag: BaseQuantizeConfig(**v)})")
        notes.extend(ctx.notes)
        return ExportResult(target=self.NAME, text=json.dumps(per_tag, indent=1) + "\n",
                            suffix=self.SUFFIX, notes=tuple(notes), changed=dict(ctx.changed))


EXPORTER = HqqExporter()
