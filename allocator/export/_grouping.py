"""One setting per module, and the groups of modules that must share one.

:func:`module_settings` turns the plan into one setting per module (column-group units refused,
or merged in ``lossy`` mode); :func:`merge_groups` makes every group a target requires to agree
(fused layers — vLLM's ``qkv_proj`` / ``gate_up_proj`` by :data:`allocator.core.units.DEFAULT_FUSION`
—, HQQ tags, GGUF tensors): refused, or in ``lossy`` mode raised to the group's highest setting,
each change reported.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from allocator.core.formats import QuantFormat
from allocator.core.units import DEFAULT_FUSION
from allocator.export._exporter import ExportContext, module_of
from allocator.export._settings import Setting, skip_setting

__all__ = ["enforce_fusion", "fused_name", "fusion_groups", "merge_groups", "module_settings"]


def module_settings(ctx: ExportContext, convert: Callable[[str, QuantFormat], Setting]) -> dict[str, Setting]:
    """Per-module settings of the plan: converts each option, checks names, merges groups.

    Column-group units (``m[g=i]``) are refused: every target here sets one setting per module.
    In lossy mode each module takes the highest setting of its groups.
    """
    fmts = ctx.formats()
    per_module: dict[str, list[tuple[str, Setting]]] = defaultdict(list)
    for unit, fmt in fmts.items():
        module, g = module_of(unit)
        if g is not None and not ctx.lossy:
            raise ctx.fail(f"unit {unit!r} is a column group; this target sets one setting per "
                           "module: solve with module-level units",
                           lossy_hint="raise each module to its groups' highest setting")
        per_module[module].append((unit, convert(unit, fmt)))
    if ctx.model_names is not None:
        missing = sorted(m for m in per_module if m not in ctx.model_names)
        if missing:
            raise ctx.fail(f"plan unit {missing[0]!r} is not a module of the model"
                           f"{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                           "export the plan against the model it was made for")
    out: dict[str, Setting] = {}
    for module, items in per_module.items():
        top = max(s for _, s in items)
        for unit, s in items:
            if s.key != top.key:
                ctx.changed[unit] = (s.label, top.label)
        out[module] = top
    if any(module_of(u)[1] is not None for u in fmts):
        ctx.notes.append("lossy: column-group units merged per module at their highest setting")
    return out


def merge_groups(
    ctx: ExportContext, settings: dict[str, Setting], groups: Mapping[str, Sequence[str]], why: str,
) -> dict[str, Setting]:
    """Make every group of modules share one setting: refuse, or (lossy) raise to the max.

    ``groups`` maps a group id (fused layer, HQQ tag, GGUF tensor) to its member modules;
    members absent from ``settings`` (not in the plan) count as unquantized.
    """
    out = dict(settings)
    for gid, members in groups.items():
        present = {m: settings.get(m, skip_setting()) for m in members}
        keys = {s.key for s in present.values()}
        if len(keys) <= 1:
            continue
        if not ctx.lossy:
            desc = ", ".join(f"{m.rsplit('.', 1)[-1] if '.' in m else m}={s.label}"
                             for m, s in list(present.items())[:4])
            unplanned = [m for m in members if m not in settings]
            extra = f"; {unplanned[0]!r} is not in the plan (unquantized)" if unplanned else ""
            raise ctx.fail(f"{why} {gid!r} needs one setting but the plan gives {desc}{extra}",
                           lossy_hint=True)
        top = max(present.values())
        for m, s in present.items():
            if s.key != top.key:
                ctx.changed[m] = (s.label, top.label)
                out[m] = top
    return out


def fused_name(name: str, fusion: Mapping[str, str] = DEFAULT_FUSION) -> str | None:
    """The runtime-fused layer a module belongs to (``…self_attn.qkv_proj``), if any."""
    for pattern, template in fusion.items():
        if re.match(pattern, name):
            return re.sub(pattern, template, name)
    return None


def fusion_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Fused layer → members (≥ 2), by :data:`allocator.core.units.DEFAULT_FUSION`."""
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        f = fused_name(n)
        if f is not None:
            groups[f].append(n)
    return {f: sorted(ms) for f, ms in groups.items() if len(ms) > 1}


def enforce_fusion(ctx: ExportContext, settings: dict[str, Setting]) -> dict[str, Setting]:
    """q/k/v and gate/up (vLLM ``qkv_proj``/``gate_up_proj``) must share one setting."""
    names = set(settings) | (ctx.model_names or frozenset())
    return merge_groups(ctx, settings, fusion_groups(names), "fused layer")
