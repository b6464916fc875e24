"""Resolve a bit plan against a model: which weight columns each unit covers and how it is stored.

A plan names layer units (``encoder.layer.0.attention.self.query``) or column-group units
(``...query[g=2]``, input columns ``2·G … 3·G−1``). Group widths come from the ``units`` the
caller discovered (``discover_units(model, group_columns=G)``); without them the width is
inferred as ``⌈in / n_groups⌉`` from how many groups of the module the plan lists, and refused
when that does not reproduce the group count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from allocator.core.errors import BackendError, InvalidPlanError, ModelError, UnknownNameError
from allocator.core.formats import FormatKind, QuantFormat, parse_format
from allocator.core.plan import Assignment, BitPlan
from allocator.core.units import weight_view

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit

__all__ = ["ResolvedUnit", "check_assignment", "module_weight", "resolve_plan"]

_GROUP_RE = re.compile(r"^(?P<module>.+)\[g=(?P<g>\d+)\]$")


@dataclass(frozen=True, kw_only=True)
class ResolvedUnit:
    """One plan unit tied to a module's weight columns [lo, hi) and its parsed format."""

    name: str
    module: str
    lo: int
    hi: int
    fmt: QuantFormat
    assignment: Assignment


def check_assignment(unit: str, a: Assignment) -> QuantFormat:
    """The format of an assignment, refusing labels, bits or group sizes a format cannot hold."""
    try:
        fmt = parse_format(a.option)
    except UnknownNameError as exc:
        raise InvalidPlanError(f"unit {unit!r}: {exc}") from None
    if fmt.kind is FormatKind.GGUF and fmt.emulation is None and fmt.is_quantized:
        raise InvalidPlanError(
            f"unit {unit!r} takes {a.option!r}, a codebook GGUF type that the fake-quantization "
            "backend cannot emulate; use an int option or a k-quant (q2_K..q6_K, q4_0, q8_0)"
        )
    if not math.isclose(float(a.bits), float(fmt.bits)):
        raise InvalidPlanError(
            f"unit {unit!r} declares {a.bits:g} bits but option {a.option!r} holds {fmt.bits}; "
            "fix the plan's 'bits' (or regenerate it from the table)"
        )
    if fmt.kind is FormatKind.INT:
        if a.group_size is not None and a.group_size != fmt.group_size:
            raise InvalidPlanError(
                f"unit {unit!r} declares group_size {a.group_size} but option {a.option!r} "
                f"uses {fmt.group_size}; fix the plan"
            )
        if a.symmetric is not None and a.symmetric != fmt.symmetric:
            raise InvalidPlanError(
                f"unit {unit!r} declares symmetric={a.symmetric} but option {a.option!r} "
                f"is {'sym' if fmt.symmetric else 'asym'}metric; fix the plan"
            )
    return fmt


def module_weight(model: torch.nn.Module, module: str) -> torch.Tensor:
    """A module's weight laid out [out, in, ...], as a view that writes through (Conv1D's
    [in, out] storage transposed; BackendError when it has none)."""
    try:
        return weight_view(model.get_submodule(module), module)
    except ModelError as exc:
        raise BackendError(str(exc)) from None


def _weight_2d(model: torch.nn.Module, module: str) -> torch.Tensor:
    import torch

    try:
        mod = model.get_submodule(module)
    except AttributeError:
        raise InvalidPlanError(
            f"plan unit {module!r} is not a module of this model; check that the plan was made "
            "for this model (unit names come from 'bitalloc estimate')"
        ) from None
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise InvalidPlanError(f"plan unit {module!r} has no 2-D weight to quantize")
    return weight_view(mod, module)


def resolve_plan(
    model: torch.nn.Module, plan: BitPlan, units: Sequence[Unit] | None = None
) -> list[ResolvedUnit]:
    """Every plan unit with its module, column range and format, in plan order.

    Raises:
        InvalidPlanError: a unit names no module of the model, group ranges overlap or cannot be
            inferred, an option is not in the catalogue, or its bits/group size disagree.
    """
    known = {u.name: u for u in units or ()}
    groups: dict[str, list[int]] = {}
    for name in plan.assignments:
        m = _GROUP_RE.match(name)
        if m and name not in known:
            groups.setdefault(m["module"], []).append(int(m["g"]))
    out: list[ResolvedUnit] = []
    for name, a in plan.assignments.items():
        fmt = check_assignment(name, a)
        if name in known:
            u = known[name]
            _weight_2d(model, u.module)
            lo, hi = u.columns if u.columns is not None else (0, u.in_features)
            out.append(ResolvedUnit(name=name, module=u.module, lo=lo, hi=hi, fmt=fmt, assignment=a))
            continue
        m = _GROUP_RE.match(name)
        module = m["module"] if m else name
        w = _weight_2d(model, module)
        cols = int(w[0].numel())
        if m is None:
            out.append(ResolvedUnit(name=name, module=module, lo=0, hi=cols, fmt=fmt, assignment=a))
            continue
        lo, hi = _group_range(module, int(m["g"]), groups[module], cols)
        out.append(ResolvedUnit(name=name, module=module, lo=lo, hi=hi, fmt=fmt, assignment=a))
    _check_overlaps(out)
    return out


def _group_range(module: str, g: int, listed: list[int], cols: int) -> tuple[int, int]:
    n = max(listed) + 1
    width = math.ceil(cols / n)
    if math.ceil(cols / width) != n or sorted(listed) != list(range(n)):
        raise InvalidPlanError(
            f"cannot infer the column groups of {module!r} from the plan (groups {sorted(listed)[:8]} "
            f"of {cols} columns); pass units=discover_units(model, group_columns=G)"
        )
    return g * width, min((g + 1) * width, cols)


def _check_overlaps(units: list[ResolvedUnit]) -> None:
    by_module: dict[str, list[ResolvedUnit]] = {}
    for u in units:
        by_module.setdefault(u.module, []).append(u)
    for module, us in by_module.items():
        us = sorted(us, key=lambda u: u.lo)
        for a, b in zip(us, us[1:], strict=False):
            if b.lo < a.hi:
                raise InvalidPlanError(
                    f"plan units {a.name!r} and {b.name!r} cover the same columns of {module!r}; "
                    "use layer units or column groups, not both"
                )
