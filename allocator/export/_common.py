"""What every exporter shares: plan → per-module settings, fusion and group rules, regexes.

A *setting* is what one module gets in a target: unquantized (``skip``), an integer grid
(bits, group size, symmetry) or a GGUF tensor type. Exporters convert each plan option into
their own settings and refuse (:class:`~allocator.core.errors.ExportError`) when the plan cannot be
expressed; in ``lossy`` mode the documented fallback is to *raise* every module of a group that
must share one setting to the highest setting among them, and to report each change.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from allocator.core.errors import ExportError, UnknownNameError
from allocator.core.formats import GGUF_TYPES, FormatKind, QuantFormat, parse_format
from allocator.core.plan import BitPlan
from allocator.core.units import DEFAULT_FUSION

__all__ = [
    "ExportContext",
    "Setting",
    "anchored_patterns",
    "fused_name",
    "int_setting",
    "merge_groups",
    "module_of",
]

_GROUP_RE = re.compile(r"^(?P<module>.+)\[g=(?P<g>\d+)\]$")

#: GGUF types whose block is exactly an integer grid with fp16 scale (+ fp16 min) per 32
#: weights, i.e. the same storage as ``int{b}-g32-{sym|asym}`` under the fp16 scale(+zero)
#: convention (q4_0 = 4 + 16/32 = 4.5 bpw = int4-g32-sym ...).
GGUF_EXACT_INT: Mapping[str, tuple[int, int, bool]] = {
    "q4_0": (4, 32, True), "q4_1": (4, 32, False), "q5_0": (5, 32, True),
    "q5_1": (5, 32, False), "q8_0": (8, 32, True),
}
INT_EXACT_GGUF: Mapping[tuple[int, int, bool], str] = {v: k for k, v in GGUF_EXACT_INT.items()}


@dataclass(frozen=True, kw_only=True, order=True)
class Setting:
    """One module's setting in a target; ``rank`` orders settings from cheapest to richest."""

    rank: tuple[float, ...] = field(compare=True)
    skip: bool = field(default=False, compare=False)
    bits: int | None = field(default=None, compare=False)
    group_size: int | None = field(default=None, compare=False)  #: -1 = per channel
    symmetric: bool | None = field(default=None, compare=False)
    gguf: str | None = field(default=None, compare=False)
    float_dtype: str = field(default="fp16", compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.skip, self.bits, self.group_size, self.symmetric, self.gguf)

    @property
    def label(self) -> str:
        if self.skip:
            return self.float_dtype
        if self.gguf is not None:
            return self.gguf
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


def skip_setting(dtype: str = "fp16") -> Setting:
    return Setting(rank=(float("inf"),), skip=True, float_dtype=dtype)


def int_setting(bits: int, group_size: int, symmetric: bool) -> Setting:
    # finer groups and a zero point are "more" precision at equal bits; per channel is coarsest
    fineness = 0.0 if group_size == -1 else 1.0 / group_size
    return Setting(rank=(float(bits), fineness, float(not symmetric)), bits=bits,
                   group_size=group_size, symmetric=symmetric)


def gguf_setting(name: str) -> Setting:
    if name in ("f16", "bf16"):
        return skip_setting("bf16" if name == "bf16" else "fp16")
    return Setting(rank=(GGUF_TYPES[name].bpw,), gguf=name, bits=GGUF_TYPES[name].payload_bits)


def module_of(unit: str) -> tuple[str, int | None]:
    """``'m[g=3]'`` → ``('m', 3)``; a module unit → ``(unit, None)``."""
    m = _GROUP_RE.match(unit)
    return (m["module"], int(m["g"])) if m else (unit, None)


def fused_name(name: str, fusion: Mapping[str, str] = DEFAULT_FUSION) -> str | None:
    """The runtime-fused layer a module belongs to (``…self_attn.qkv_proj``), if any."""
    for pattern, template in fusion.items():
        if re.match(pattern, name):
            return re.sub(pattern, template, name)
    return None


@dataclass(kw_only=True)
class ExportContext:
    """The plan plus what is known about the model, and the notes an export collects."""

    plan: BitPlan
    target: str
    lossy: bool = False
    model_names: frozenset[str] | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    arch: str | None = None  #: model family (HF ``model_type``), for GGUF tensor names
    notes: list[str] = field(default_factory=list)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)

    def fail(self, message: str, *, lossy_hint: bool | str = False) -> ExportError:
        """A one-line error; ``lossy_hint`` names what --lossy would do instead."""
        what = "raise them to the highest setting" if lossy_hint is True else lossy_hint
        hint = f" (or pass --lossy to {what})" if what else ""
        return ExportError(f"{self.target}: {message}{hint}")

    def formats(self) -> dict[str, QuantFormat]:
        """unit → parsed option (unknown labels refused)."""
        out: dict[str, QuantFormat] = {}
        for unit, a in self.plan.assignments.items():
            try:
                out[unit] = parse_format(a.option)
            except UnknownNameError:
                raise self.fail(f"unit {unit!r} has option {a.option!r}, which is not in the format "
                                "catalogue; use fp16, int<b>-g<g>-<sym|asym> or a GGUF type") from None
        return out

    def in_features(self, module: str) -> int | None:
        shape = self.shapes.get(module)
        if not shape or len(shape) < 2:
            return None
        n = 1
        for d in shape[1:]:
            n *= d
        return n

    def params(self, module: str) -> int | None:
        shape = self.shapes.get(module)
        if not shape:
            return None
        n = 1
        for d in shape:
            n *= d
        return n


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


def int_of(ctx: ExportContext, unit: str, fmt: QuantFormat) -> Setting:
    """An integer-grid target's setting: fp16/bf16 → skip; GGUF types only where exact."""
    if fmt.kind is FormatKind.FLOAT:
        return skip_setting(fmt.name)
    if fmt.kind is FormatKind.INT:
        return int_setting(fmt.bits, fmt.group_size or -1, fmt.symmetric)
    if fmt.name in ("f16", "bf16"):
        return skip_setting("bf16" if fmt.name == "bf16" else "fp16")
    if fmt.name in GGUF_EXACT_INT:
        return int_setting(*GGUF_EXACT_INT[fmt.name])
    emu = GGUF_TYPES[fmt.name].emulation
    if ctx.lossy and emu is not None:
        s = int_setting(*emu)
        ctx.changed[unit] = (fmt.name, s.label)
        return s
    why = ("has no integer-grid equivalent" if emu is None
           else "is a GGUF super-block type with no exact integer-grid equivalent")
    raise ctx.fail(f"unit {unit!r} takes GGUF type {fmt.name!r}, which {why}",
                   lossy_hint=emu is not None and "use the type's integer emulation grid")


def anchored_patterns(
    names: Iterable[str], *, extra_leaves: Mapping[str, Sequence[str]] | None = None,
    suffix: str = "",
) -> list[str]:
    """Anchored regexes (``^…$``) whose union matches exactly ``names`` (+ ``extra_leaves``).

    Names sharing a parent are folded into a leaf alternation, then parents differing only in
    their last numeric component (the layer index) into an index alternation, so each pattern
    matches exactly the cross product it was built from. ``extra_leaves[parent]`` adds leaves
    (vLLM fused names) to a parent's alternation. Only ``\\.``, ``(…|…)``, ``^``, ``$`` are used:
    valid and equal in Python ``re``, PCRE and ECMAScript, and unchanged by lower-casing.
    """
    by_parent: dict[str, set[str]] = defaultdict(set)
    for n in names:
        parent, _, leaf = n.rpartition(".")
        by_parent[parent].add(leaf)
    for parent, extra in (extra_leaves or {}).items():
        if parent in by_parent:
            by_parent[parent].update(extra)
    # (head, tail, leaves) → layer indices; None marks a parent with no numeric component
    templ: dict[tuple[str, str | None, tuple[str, ...]], list[str]] = defaultdict(list)
    for parent, leaves in by_parent.items():
        parts = parent.split(".") if parent else []
        idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if idx is None:
            templ[(parent, None, tuple(sorted(leaves)))].append("")
        else:
            templ[(".".join(parts[:idx]), ".".join(parts[idx + 1:]), tuple(sorted(leaves)))].append(
                parts[idx])
    out: list[str] = []
    for (head, tail, leaf_names), indices in templ.items():
        pieces = [re.escape(head)] if head else []
        if tail is not None:
            pieces.append(_alt(sorted(indices, key=int)))
            if tail:
                pieces.append(re.escape(tail))
        pieces.append(_alt(leaf_names))
        out.append("^" + r"\.".join(pieces) + re.escape(suffix) + "$")
    return sorted(out)


def _alt(items: Sequence[str]) -> str:
    if len(items) == 1:
        return re.escape(items[0])
    return "(" + "|".join(re.escape(x) for x in items) + ")"


def group_by_setting(settings: Mapping[str, Setting]) -> list[tuple[Setting, list[str]]]:
    """Modules per distinct setting, richest setting first (stable, deterministic)."""
    groups: dict[tuple[Any, ...], tuple[Setting, list[str]]] = {}
    for name in sorted(settings):
        s = settings[name]
        groups.setdefault(s.key, (s, []))[1].append(name)
    return sorted(groups.values(), key=lambda sv: (sv[0].rank, sv[0].label), reverse=True)


#: a target's accounting: bits per weight of a setting for a weight of shape (out, in), or
#: for an unknown shape (None) where the formula does not need it (raises ExportError otherwise)
BpwFn = Callable[[Setting, tuple[int, int] | None], float]


def needs_shape(shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is None:
        raise ExportError("needs the weight shape")
    return shape


def weighted_bpw(ctx: ExportContext, settings: Mapping[str, Setting], bpw: BpwFn) -> str:
    """'X bpw over N planned modules' under a target's accounting, or per-setting values."""
    total_bits = total_params = 0.0
    for m, s in settings.items():
        p, in_f = ctx.params(m), ctx.in_features(m)
        if p is None or in_f is None:
            break
        total_bits += bpw(s, (p // in_f, in_f)) * p
        total_params += p
    else:
        if total_params:
            return f"{total_bits / total_params:.4f} bpw over the {len(settings)} planned modules"
    vals = []
    for label, s in sorted({s.label: s for s in settings.values()}.items()):
        try:
            vals.append(f"{label}={bpw(s, None):.4g}")
        except ExportError:
            vals.append(f"{label}=n/a")
    return "bpw per setting " + ", ".join(vals) + " (pass the model for the weighted average)"


def plan_header(ctx: ExportContext, target_line: str) -> list[str]:
    """The lines every export reports: the plan's own bpw, the target's, and lossy changes."""
    s = ctx.plan.summary
    lines = [f"bitalloc plan: {len(ctx.plan.assignments)} units, {s.params} params, "
             f"{s.bpw:.4f} bpw (bitalloc accounting: b + 16/g sym, b + 32/g asym)",
             f"{ctx.target} accounting: {target_line}"]
    if ctx.changed:
        first = ", ".join(f"{u}: {a}->{b}" for u, (a, b) in list(ctx.changed.items())[:3])
        lines.append(f"LOSSY: {len(ctx.changed)} unit(s) changed from the plan, e.g. {first}")
    return lines
