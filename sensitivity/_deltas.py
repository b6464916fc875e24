"""Quantization deltas ``ΔW_{u,o} = Q_o(W_u) − W_u`` kept in bounded memory.

The curvature estimators contract every sampled gradient with every unit × option delta
(``½⟨ΔW, g⟩²``, ``½ Σ g² ΔW²``). Holding the deltas as float32 costs 4 bytes × options per
weight — 3.5 GB for a 110M model with 8 options, 32 GB at 1B. Here they are kept as the integer
grid stores them (:class:`~allocator.model.quant.RTNCodes`: 1 byte per weight and option plus a
scale and zero per group) and rebuilt one option at a time when a gradient arrives; float options
(fp16/bf16) keep nothing and recompute the cast. The rebuilt delta is bit-identical to
``fake_quantize(W) − W``.

When even the codes exceed a memory budget, :func:`delta_groups` splits the units into groups
that each fit, and the estimator makes one pass over the calibration data per group (the sampled
cotangents are seeded per row, so every pass draws the same ones and the table does not depend
on the split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import FormatKind, QuantFormat
from allocator.core.units import Unit

if TYPE_CHECKING:
    import torch

    from allocator.model.quant import RTNCodes

__all__ = ["QuantDeltas", "check_delta_budget", "delta_bytes", "delta_groups"]

#: Default ceiling for the stored deltas of one pass (codes + scales), in MiB.
DEFAULT_DELTA_BUDGET_MB = 1024


def _is_float(fmt: QuantFormat) -> bool:
    return fmt.kind is FormatKind.FLOAT or fmt.name in ("f16", "bf16")


def delta_bytes(unit: Unit, options: Sequence[QuantFormat]) -> int:
    """Bytes :class:`QuantDeltas` holds for one unit: a uint8 code per weight and integer
    option, plus a float32 scale and zero per group (bounded above by 8 bytes per column)."""
    n = sum(0 if _is_float(f) else 1 for f in options)
    rows = unit.params // max(unit.in_features, 1)
    groups = 0
    for f in options:
        if _is_float(f) or f.emulation is None:
            continue
        g = f.emulation[1]
        groups += rows * (1 if g == -1 else -(-unit.in_features // g))
    return n * unit.params + 8 * groups


def delta_groups(units: Sequence[Unit], options: Sequence[QuantFormat],
                 budget_bytes: int) -> list[list[int]]:
    """Consecutive unit indices split so each group's :func:`delta_bytes` sum ≤ the budget
    (a unit larger than the budget gets a group of its own). Consecutive units sit close in
    depth, so a group's backward stops early when it lies deep in the model."""
    groups: list[list[int]] = []
    used = 0
    for i, unit in enumerate(units):
        b = delta_bytes(unit, options)
        if not groups or used + b > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += b
    return groups


def check_delta_budget(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParameterError(
            f"delta_budget_mb must be a number > 0 (MiB of quantization deltas kept per pass), "
            f"got {value!r}")
    return int(value * 2**20)


@dataclass(frozen=True)
class QuantDeltas:
    """``ΔW_{u,o}`` of some units, stored as RTN codes (module doc)."""

    weights: tuple[torch.Tensor, ...]  #: the unit blocks of the live model (float views)
    codes: tuple[tuple[RTNCodes | None, ...], ...]  #: per unit, per option (None: float)
    options: tuple[QuantFormat, ...]

    @classmethod
    def build(cls, model: torch.nn.Module, units: Sequence[Unit],
              options: Sequence[QuantFormat]) -> QuantDeltas:
        import torch

        from allocator.core.units import unit_weight
        from allocator.model.quant import rtn_codes

        weights, codes = [], []
        with torch.no_grad():
            for unit in units:
                w = unit_weight(model, unit).detach()
                w2 = w.reshape(w.shape[0], -1)
                per: list[RTNCodes | None] = []
                for f in options:
                    if _is_float(f):
                        per.append(None)
                    elif f.emulation is None:
                        raise InvalidParameterError(
                            f"format {f.name!r} is a codebook type that RTN cannot emulate; "
                            "use an int or k-quant option")
                    else:
                        bits, group, sym = f.emulation
                        per.append(rtn_codes(w2, bits=bits, group_size=group, symmetric=sym))
                weights.append(w2)
                codes.append(tuple(per))
        return cls(weights=tuple(weights), codes=tuple(codes), options=tuple(options))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for per in self.codes for c in per if c is not None)

    def delta(self, i: int, o: int) -> torch.Tensor:
        """``Q_o(W_i) − W_i`` as float32 [out, cols] (rebuilt; bit-identical to fake_quantize)."""
        import torch

        w = self.weights[i].float()
        c = self.codes[i][o]
        if c is None:
            dtype = torch.bfloat16 if self.options[o].name == "bf16" else torch.float16
            return w.to(dtype).float() - w
        return c.dequantize() - w

    def quadratic(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """``½ ⟨ΔW_{i,o}, g⟩²`` per option o (float64 [options]); ``g`` is the unit block."""
        import torch

        flat = g.reshape(-1).float()
        inner = torch.stack([self.delta(i, o).reshape(-1) @ flat for o in range(len(self.options))])
        return 0.5 * inner.double() ** 2

    def diagonal(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """``½ Σ_j g_j² ΔW_{i,o,j}²`` per option o (float64 [options])."""
        import torch

        g2 = g.reshape(-1).float() ** 2
        return 0.5 * torch.stack([self.delta(i, o).reshape(-1) ** 2 @ g2
                                  for o in range(len(self.options))]).double()
