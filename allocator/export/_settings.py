"""Settings: what one module gets in a target.

A *setting* is unquantized (``skip``), an integer grid (bits, group size, symmetry) or a GGUF
tensor type. Exporters convert each plan option into their own settings (integer-grid targets
through :func:`int_of`) and refuse (:class:`~allocator.core.errors.ExportError`) when the plan
cannot be expressed; ``rank`` orders settings so that ``lossy`` mode can raise a module to the
richest setting of a group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from allocator.core.formats import GGUF_TYPES, FormatKind, QuantFormat
from allocator.export._exporter import ExportContext

__all__ = ["GGUF_EXACT_INT", "INT_EXACT_GGUF", "Setting", "gguf_setting", "group_by_setting", "int_of",
           "int_setting", "skip_setting"]

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


def group_by_setting(settings: Mapping[str, Setting]) -> list[tuple[Setting, list[str]]]:
    """Modules per distinct setting, richest setting first (stable, deterministic)."""
    groups: dict[tuple[Any, ...], tuple[Setting, list[str]]] = {}
    for name in sorted(settings):
        s = settings[name]
        groups.setdefault(s.key, (s, []))[1].append(name)
    return sorted(groups.values(), key=lambda sv: (sv[0].rank, sv[0].label), reverse=True)
