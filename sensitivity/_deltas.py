"""Quantization deltas ``ΔW_{u,o} = Q_o(W_u) − W_u`` under a memory budget.

The curvature estimators contract every sampled gradient with every unit × option delta
(``½⟨ΔW, g⟩²``, ``½ Σ g² ΔW²``). The contraction is one float32 gemv per unit, the fastest form
on CPU and GPU alike, so the deltas are kept as float32 — 4 bytes × options per weight: 3.5 GB
for a 110M model with 8 options, 32 GB at 1B. :func:`delta_groups` therefore splits the units
into consecutive groups whose deltas fit ``budget_bytes``, and the estimator makes one pass over
the calibration data per group, holding one group's deltas and asking autograd for that group's
gradients only (its backward stops at the group's earliest unit). The sampled cotangents are
seeded per row, so every pass draws the same ones and the table does not depend on the split.

Rebuilding the deltas from their integer codes (1 byte per weight and option) was measured and
rejected: on a 110M model the per-sample contraction went from 0.6 s to 45 s on 2 CPU cores,
the uint8 → float conversion dominating; one more pass over the data costs far less.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat
from allocator.core.units import Unit, unit_weight
from allocator.model.quant import Quantizer, RtnQuantizer

if TYPE_CHECKING:
    import torch

    from sensitivity._base import EstimateContext

__all__ = ["DEFAULT_DELTA_BUDGET_MB", "balanced_groups", "check_delta_budget", "delta_bytes",
           "delta_groups", "quant_deltas", "weight_deltas"]

#: Default ceiling for the float32 deltas held by one pass, in MiB: a quarter of the 1 GB a run
#: may add to the model (``model + one batch + 1 GB``, docs/memory.md), the rest left to one
#: row's logits and cotangents, the autograd graph, the head's weight gradient and the
#: quantizer's temporaries (measured per stage in docs/memory.md). 256 keeps SmolLM2's estimate
#: under 2.0 GB (1832 MiB against 1950 at 384: its tied head's deltas go in more row pieces,
#: +15 s); its blocks' 226 MB of deltas fit either way, a BERT-base block's 340 MB take two
#: groups. More passes or pieces, the same table (the cotangents are seeded per row).
DEFAULT_DELTA_BUDGET_MB = 256


def delta_bytes(unit: Unit, options: Sequence[QuantFormat]) -> int:
    """Bytes of one unit's deltas: float32 per weight and option."""
    return 4 * unit.params * len(options)


def delta_groups(units: Sequence[Unit], options: Sequence[QuantFormat],
                 budget_bytes: int) -> list[list[int]]:
    """Consecutive unit indices in the fewest groups whose :func:`delta_bytes` fit the budget (a
    unit larger than the budget gets a group of its own), balanced so the largest group is as
    small as that number of groups allows. Consecutive units sit close in depth, so a deep
    group's backward stops early."""
    return balanced_groups([delta_bytes(u, options) for u in units], budget_bytes)


def balanced_groups(sizes: Sequence[int], budget_bytes: int) -> list[list[int]]:
    """Consecutive indices of ``sizes`` in the fewest groups of total ≤ ``budget_bytes`` (an item
    over the budget gets a group of its own), balanced so the largest group is as small as that
    number of groups allows."""
    fewest = len(_fill(sizes, budget_bytes))
    lo, hi = max(sum(sizes) / max(fewest, 1), max(sizes, default=0)), float(budget_bytes)
    if lo >= hi:  # some unit alone is over the budget: balancing cannot lower the peak
        return _fill(sizes, budget_bytes)
    for _ in range(40):  # bisect the smallest cap that still needs only `fewest` groups
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if len(_fill(sizes, mid)) <= fewest else (mid, hi)
    return _fill(sizes, hi)


def _fill(sizes: Sequence[int], cap: float) -> list[list[int]]:
    """Greedy consecutive groups of total ≤ cap (optimal in the number of groups)."""
    groups: list[list[int]] = []
    used = 0
    for i, b in enumerate(sizes):
        if not groups or used + b > cap:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += b
    return groups


def check_delta_budget(value: Any, *, name: str = "delta_budget_mb",
                       held: str = "quantization deltas") -> int:
    """A per-pass memory budget in MiB (``delta_budget_mb`` by default) → bytes, or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidParameterError(
            f"{name} must be a number > 0 (MiB of {held} held per pass), got {value!r}")
    return int(value * 2**20)


def quant_deltas(model: torch.nn.Module, ctx: EstimateContext, *,
                 squared: bool = False) -> list[torch.Tensor]:
    """``ΔW = Q_o(W) − W`` (or ``ΔW²``) per unit stacked over options, float32 [options, out,
    cols], with the plan's quantizer (``ctx.quantizer``: RTN by default,
    :class:`allocator.model.quant.Quantizer`), on the weight's device. 4 bytes × options per
    weight: callers hold them under a budget (:func:`delta_groups`)."""
    return [weight_deltas(unit, unit_weight(model, unit), ctx.options, ctx.quantizer, squared=squared)
            for unit in ctx.units]


def weight_deltas(unit: Unit, weight: torch.Tensor, options: Sequence[Any], quantizer: Quantizer, *,
                  squared: bool, rows: tuple[int, int] | torch.Tensor | None = None) -> torch.Tensor:
    """``Q_o(W) − W`` (or its square) of a unit's 2-D weight view, float32 [options, out, cols];
    only ``rows`` of it when given: a range [lo, hi) or a 1-D index of output rows. RTN quantizes
    those rows alone; another quantizer the whole unit (cached), then the rows — GPTQ and ggml
    treat rows independently too, so they are the rows of the whole."""
    import torch

    with torch.no_grad():
        full = weight.detach().float()
        if isinstance(rows, torch.Tensor):
            pick: Any = rows.to(full.device)
        else:
            lo, hi = rows if rows is not None else (0, int(weight.shape[0]))
            pick = slice(lo, hi)
        w = full[pick]
        # filled in place: a list of options then torch.stack would hold the deltas twice
        d = torch.empty((len(options), *w.shape), dtype=torch.float32, device=w.device)
        for o, fmt in enumerate(options):
            d[o] = (quantizer.quantize(unit, w, fmt) if isinstance(quantizer, RtnQuantizer)
                    else quantizer.quantize(unit, full, fmt)[pick])
            d[o] -= w
        return d.square_() if squared else d
