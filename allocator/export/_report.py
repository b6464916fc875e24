"""What every export reports: the plan's bits per weight under bitalloc's accounting and under
the target's (:func:`weighted_bpw`, from a target's :data:`BpwFn`), and the units ``lossy``
mode changed (:func:`plan_header`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from allocator.core.errors import ExportError
from allocator.export._exporter import ExportContext
from allocator.export._settings import Setting

__all__ = ["BpwFn", "needs_shape", "plan_header", "weighted_bpw"]

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
