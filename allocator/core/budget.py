"""Budgets: one primary size cap plus optional resource caps and per-unit restrictions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from allocator.core.errors import InvalidBudgetError

__all__ = ["CAP_ATOL", "SIZE_RTOL", "Budget"]

#: Relative slack when comparing a plan's size or resources with a cap (float sums differ by order).
SIZE_RTOL = 1e-9
#: Absolute slack on top of it for the resource caps, which may be 0.
CAP_ATOL = 1e-12


def _positive(name: str, value: float | None) -> None:
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise InvalidBudgetError(f"budget {name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What a plan must fit.

    Exactly one primary cap: ``bpw`` (Σ size_bits / Σ params over the table's units) or
    ``size_bytes``. ``max`` caps any numeric resource column of the table (``{"bops": 1e9}``).
    ``min_bits`` / ``max_bits`` restrict the payload bits of every unit; ``allowed``,
    ``unit_min_bits`` and ``unit_max_bits`` restrict single units by name.

    Example:
        >>> Budget(bpw=3.0).size_cap_bits(total_params=1000)
        3000.0
    """

    bpw: float | None = None
    size_bytes: float | None = None
    max: Mapping[str, float] = field(default_factory=dict)
    min_bits: float | None = None
    max_bits: float | None = None
    allowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unit_min_bits: Mapping[str, float] = field(default_factory=dict)
    unit_max_bits: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.bpw is None) == (self.size_bytes is None):
            raise InvalidBudgetError(
                f"give exactly one primary cap: bpw={self.bpw!r}, size_bytes={self.size_bytes!r}"
            )
        _positive("bpw", self.bpw)
        _positive("size_bytes", self.size_bytes)
        for name, cap in self.max.items():
            if not isinstance(name, str) or name in ("size_bits", "cost", "params", "bits"):
                raise InvalidBudgetError(
                    f"cannot cap column {name!r} with max=; use bpw/size_bytes for size"
                )
            if not isinstance(cap, int | float) or not math.isfinite(cap) or cap < 0:
                raise InvalidBudgetError(f"budget max[{name!r}] must be finite and ≥ 0, got {cap!r}")
        _positive("min_bits", self.min_bits)
        _positive("max_bits", self.max_bits)
        if self.min_bits is not None and self.max_bits is not None and self.min_bits > self.max_bits:
            raise InvalidBudgetError(
                f"min_bits={self.min_bits} exceeds max_bits={self.max_bits}; swap or widen them"
            )
        for unit, opts in self.allowed.items():
            if isinstance(opts, str) or not opts:
                raise InvalidBudgetError(
                    f"allowed[{unit!r}] must be a non-empty tuple of option labels, got {opts!r}"
                )
        object.__setattr__(self, "max", dict(self.max))
        object.__setattr__(self, "allowed", {k: tuple(v) for k, v in self.allowed.items()})

    @property
    def primary(self) -> tuple[str, float]:
        """("bpw", value) or ("size_bytes", value)."""
        if self.bpw is not None:
            return "bpw", float(self.bpw)
        assert self.size_bytes is not None  # one of the two is set (__post_init__)
        return "size_bytes", float(self.size_bytes)

    def size_cap_bits(self, total_params: int) -> float:
        """The primary cap in bits for a table of ``total_params`` weights."""
        if self.bpw is not None:
            return float(self.bpw) * total_params
        assert self.size_bytes is not None
        return float(self.size_bytes) * 8.0

    def primary_value(self, size_bits: float, total_params: int) -> float:
        """Express ``size_bits`` in this budget's primary unit (bpw or bytes)."""
        return size_bits / total_params if self.bpw is not None else size_bits / 8.0

    def with_size_bits(self, size_bits: float, total_params: int) -> Budget:
        """The same budget with its primary cap moved to ``size_bits``."""
        if self.bpw is not None:
            return replace(self, bpw=size_bits / total_params)
        return replace(self, size_bytes=size_bits / 8.0)

    @property
    def restricts_units(self) -> bool:
        return bool(
            self.min_bits is not None or self.max_bits is not None or self.allowed
            or self.unit_min_bits or self.unit_max_bits
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form; empty fields are left out."""
        out: dict[str, Any] = {}
        for key in ("bpw", "size_bytes", "min_bits", "max_bits"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("max", "unit_min_bits", "unit_max_bits"):
            if getattr(self, key):
                out[key] = dict(getattr(self, key))
        if self.allowed:
            out["allowed"] = {k: list(v) for k, v in self.allowed.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        known = {"bpw", "size_bytes", "max", "min_bits", "max_bits", "allowed", "unit_min_bits",
                 "unit_max_bits"}
        unknown = set(data) - known
        if unknown:
            raise InvalidBudgetError(f"unknown budget field(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(data)
        if "allowed" in kw:
            kw["allowed"] = {k: tuple(v) for k, v in kw["allowed"].items()}
        return cls(**kw)
