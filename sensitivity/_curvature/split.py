"""A term split over a unit's output rows (:class:`SplitTerm`) and the row pieces that keep each
piece's deltas under the budget (:func:`row_pieces`): shared by the whole-model passes and the
block-by-block sweep."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sensitivity._deltas import delta_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["SplitTerm", "already_finished", "row_pieces"]


@dataclass(frozen=True, kw_only=True)
class SplitTerm:
    """A per-(sample, probe) term written as ``finish(Σ_pieces linear(g_piece, ΔW_piece))`` over
    any split of a unit's output rows (RTN groups, channels and k-quant blocks lie along a row,
    so a row range quantizes exactly as inside the whole weight)."""

    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]
    #: ``linear(g₁ + g₂, ΔW) = linear(g₁, ΔW) + linear(g₂, ΔW)``: a gradient that reaches one
    #: weight by two paths (a head tied to the embedding) can be scored path by path
    additive: bool = False


def already_finished(terms: torch.Tensor) -> torch.Tensor:
    """The ``finish`` of a term that is a sum over its unit's rows already (diagonal, row blocks)."""
    return terms


def row_pieces(unit: Any, options: Sequence[Any], budget_bytes: int) -> list[tuple[int, int]]:
    """The fewest balanced output-row ranges ``[lo, hi)`` of ``unit`` whose deltas each fit
    (a single row over the budget is a piece of its own)."""
    rows = int(unit.shape[0])
    per_row = delta_bytes(unit, options) / rows
    k = math.ceil(rows / max(1, int(budget_bytes // per_row)))
    size, extra = divmod(rows, k)  # the first `extra` pieces get one more row
    bounds = np.cumsum([0] + [size + (j < extra) for j in range(k)])
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


