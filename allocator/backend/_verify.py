"""Read a quantized model back and check it against its plan.

For every unit the weights must look like the plan's format:

* **levels** — each declared group (per row, ``g`` input columns from the unit's first column)
  holds at most ``2^bits`` distinct values;
* **group size** — groups must not be coarser than declared: when, for most adjacent pairs of
  declared groups, both share one grid step and their union still fits ``2^bits`` levels, the
  weights were quantized with larger groups (a finer grouping shows up as too many levels).
  Not for GGUF types: their block is fixed by the type, and ggml's fp16 block scales of
  neighbouring blocks with nearly equal ranges often round to one value;
* **bits** — the read-back bits are ``⌈log₂ max levels⌉``; a unit whose groups are large enough
  to show its levels (``g ≥ 4·2^bits``) but never uses more than half of them is flagged;
* **float** units must be exactly representable in fp16/bf16;
* **bpw** — the total bits per weight recomputed from the formats equals the plan's summary.

With ``reference`` weights (a state dict of the unquantized model) it also reports modules the
plan leaves alone that changed, and planned units that were never quantized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from allocator.backend._resolve import ResolvedUnit, module_weight, resolve_plan
from allocator.core.errors import BackendError
from allocator.core.formats import FormatKind
from allocator.core.plan import BitPlan
from allocator.core.units import stores_transposed

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit

__all__ = ["Mismatch", "PlanMismatchError", "UnitCheck", "VerifyReport", "verify"]

_STEP_RTOL = 1e-3


@dataclass(frozen=True, kw_only=True)
class Mismatch:
    unit: str
    field: str  #: levels, group_size, bits, float, bpw, unchanged, modified
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.unit}: {self.field} expected {self.expected}, found {self.found}"


@dataclass(frozen=True, kw_only=True)
class UnitCheck:
    """What was read back from one unit."""

    unit: str
    option: str
    bits: float  #: declared
    group_size: int | None  #: declared (None for float units)
    max_levels: int  #: most distinct values in one group (0 for float units)
    bits_read: float  #: ⌈log₂ max_levels⌉, 16 for float units
    params: int


class PlanMismatchError(BackendError):
    """The model does not hold what its plan says (exception form of :class:`VerifyReport`)."""

    def __init__(self, mismatches: Sequence[Mismatch]) -> None:
        self.mismatches = list(mismatches)
        head = "; ".join(str(m) for m in self.mismatches[:3])
        more = f" (+{len(self.mismatches) - 3} more)" if len(self.mismatches) > 3 else ""
        super().__init__(f"model does not match the plan: {head}{more}")


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    units: Sequence[UnitCheck]
    mismatches: Sequence[Mismatch]
    bpw_plan: float
    bpw_read: float
    params: int = 0
    notes: Sequence[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def raise_for_mismatch(self) -> None:
        if self.mismatches:
            raise PlanMismatchError(self.mismatches)


def _groups(w: torch.Tensor, g: int) -> list[torch.Tensor]:
    cols = w.shape[1]
    width = cols if g == -1 else min(g, cols)
    return [w[:, s:s + width] for s in range(0, cols, width)]


def _levels_and_step(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: distinct values, smallest positive gap between them, and the sorted values."""
    import torch

    s, _ = torch.sort(block.double(), dim=1)
    d = s[:, 1:] - s[:, :-1]
    new = torch.cat([torch.ones_like(s[:, :1], dtype=torch.bool), d > 0], dim=1)
    levels = new.sum(1)
    pos = torch.where(d > 0, d, torch.full_like(d, math.inf))
    step = pos.amin(1) if d.shape[1] else torch.full_like(levels, math.inf, dtype=torch.float64)
    return levels, step, s


#: float64 elements of one row block in :func:`_check_int` (32 MiB): the levels of a large unit
#: (a tied 49k × 576 head is 226 MB in float64, and sorting copies it) are read block by block
_CHECK_BLOCK_ELEMENTS = 1 << 22


def _check_int(u: ResolvedUnit, w: torch.Tensor, out: list[Mismatch]) -> UnitCheck:
    emu = u.fmt.emulation
    assert emu is not None  # resolve_plan refuses formats without an emulation
    bits, g, _ = emu
    cap = 2**bits
    groups = _groups(w, g)
    coarse = len(groups) >= 2 and u.fmt.kind is not FormatKind.GGUF
    levels = [0] * len(groups)  # the most levels of any row, per group
    n_pairs = n_shared = 0
    rows = max(1, _CHECK_BLOCK_ELEMENTS // max(int(w.shape[1]), 1))
    for r0 in range(0, int(w.shape[0]), rows):
        block = [b[r0:r0 + rows] for b in groups]
        stats = [_levels_and_step(b) for b in block]
        levels = [max(m, int(lv.max())) for m, (lv, _, _) in zip(levels, stats, strict=True)]
        if coarse:
            p, sh = _shared_pairs(block, stats, cap)
            n_pairs, n_shared = n_pairs + p, n_shared + sh
    max_levels = max(levels)
    if max_levels > cap:
        worst = levels.index(max_levels)
        out.append(Mismatch(unit=u.name, field="levels", expected=f"<= {cap} per group of {g}",
                            found=f"{max_levels} in group {worst}"))
    elif coarse and n_pairs > 0 and n_shared > 0.5 * n_pairs:
        out.append(Mismatch(unit=u.name, field="group_size", expected=str(g),
                            found=f">= {2 * g} (adjacent groups share one grid)"))
    width = groups[0].shape[1]
    bits_read = float(math.ceil(math.log2(max(max_levels, 1)))) if max_levels > 1 else 1.0
    if width >= 4 * cap and max_levels <= cap // 2:
        out.append(Mismatch(unit=u.name, field="bits", expected=str(bits),
                            found=f"{bits_read:g} (at most {max_levels} levels in any group)"))
    return UnitCheck(unit=u.name, option=u.fmt.name, bits=float(u.fmt.bits), group_size=g,
                     max_levels=max_levels, bits_read=bits_read, params=int(w.numel()))


def _shared_pairs(groups: list[torch.Tensor], stats: list, cap: int) -> tuple[int, int]:
    """(row pairs compared, row pairs that share a step and fit one grid together) over the
    adjacent declared-group pairs: most pairs sharing one grid means the groups are coarser."""
    import torch

    n_pairs = n_shared = 0
    for k in range(0, len(groups) - 1, 2):
        if groups[k].shape[1] != groups[k + 1].shape[1]:
            continue
        la, sa, _ = stats[k]
        lb, sb, _ = stats[k + 1]
        merged, _, _ = _levels_and_step(torch.cat([groups[k], groups[k + 1]], dim=1))
        finite = torch.isfinite(sa) & torch.isfinite(sb)
        same = finite & ((sa - sb).abs() <= _STEP_RTOL * sa.abs().clamp_min(1e-30))
        n_shared += int((same & (merged <= cap)).sum())
        n_pairs += int(finite.sum())
    return n_pairs, n_shared


def verify(
    model: torch.nn.Module,
    plan: BitPlan,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    units: Sequence[Unit] | None = None,
) -> VerifyReport:
    """Check every planned unit of ``model`` against ``plan``; see the module docstring.

    Args:
        reference: unquantized weights by parameter name (``model.state_dict()`` taken before
            :func:`apply_plan`), for the changed/unchanged checks.
        units: discovered units (column ranges of group units).
    """
    import torch

    resolved = resolve_plan(model, plan, units)
    mismatches: list[Mismatch] = []
    checks: list[UnitCheck] = []
    size = 0.0
    with torch.no_grad():
        for u in resolved:
            w2 = _w2d(module_weight(model, u.module))[:, u.lo:u.hi].detach()
            size += u.fmt.size_bits(int(w2.numel()), u.hi - u.lo)
            if u.fmt.kind is FormatKind.FLOAT or u.fmt.emulation is None:
                checks.append(_check_float(u, w2, mismatches))
            else:
                checks.append(_check_int(u, w2, mismatches))
            if reference is not None:
                _check_changed(u, w2, _reference_2d(model, u.module, reference), mismatches)
        if reference is not None:
            _check_untouched(model, {u.module for u in resolved}, reference, mismatches)
    params = sum(c.params for c in checks)
    bpw_read = size / params if params else 0.0
    if not math.isclose(bpw_read, plan.summary.bpw, rel_tol=1e-6, abs_tol=1e-9):
        mismatches.append(Mismatch(unit="<total>", field="bpw", expected=f"{plan.summary.bpw:.6g}",
                                   found=f"{bpw_read:.6g}"))
    return VerifyReport(units=checks, mismatches=mismatches, bpw_plan=plan.summary.bpw,
                        bpw_read=bpw_read, params=params)


def _w2d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if w.dim() > 2 else w


def _check_float(u: ResolvedUnit, w: torch.Tensor, out: list[Mismatch]) -> UnitCheck:
    import torch

    low = torch.bfloat16 if u.fmt.name == "bf16" else torch.float16
    if not torch.equal(w.to(low).to(w.dtype), w):
        out.append(Mismatch(unit=u.name, field="float", expected=f"values exact in {low}",
                            found="values that round"))
    return UnitCheck(unit=u.name, option=u.fmt.name, bits=16.0, group_size=None, max_levels=0,
                     bits_read=16.0, params=int(w.numel()))


def _reference_2d(model: torch.nn.Module, module: str,
                  reference: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The module's reference weight laid out [out, in] like :func:`module_weight`."""
    ref = reference.get(f"{module}.weight")
    if ref is None:
        return None
    return _w2d(ref.t() if stores_transposed(model.get_submodule(module)) else ref)


def _check_changed(u: ResolvedUnit, w: torch.Tensor, ref: torch.Tensor | None,
                   out: list[Mismatch]) -> None:
    if ref is None or u.fmt.kind is FormatKind.FLOAT:
        return
    r = ref[:, u.lo:u.hi]
    if tuple(r.shape) == tuple(w.shape) and bool((r.to(w.dtype) == w).all()):
        out.append(Mismatch(unit=u.name, field="unchanged", expected=f"quantized ({u.fmt.name})",
                            found="the unquantized weights"))


def _check_untouched(model: torch.nn.Module, planned: set[str],
                     reference: Mapping[str, torch.Tensor], out: list[Mismatch]) -> None:
    import torch

    # a weight tied to a planned one (GPT-2's wte ↔ lm_head) is quantized through it
    tied = {module_weight(model, n).data_ptr() for n in planned}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if name in planned or not isinstance(w, torch.Tensor) or w.data_ptr() in tied:
            continue
        ref = reference.get(f"{name}.weight")
        if ref is not None and ref.shape == w.shape and not torch.equal(ref.to(w.dtype), w.detach()):
            out.append(Mismatch(unit=name, field="modified", expected="unchanged (not in the plan)",
                                found="changed weights"))
