"""Per-unit reductions of one (sample, probe)'s gradients: ``term(unit block of g, unit)``
stacked over units, either from all gradients at once or streamed, one weight's gradient alive
at a time (:func:`streamed_reduce`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sensitivity._loss import unit_block

if TYPE_CHECKING:
    import torch

__all__ = ["Reduction", "UnitReduction", "streamed_reduce", "unit_reduction"]

#: (grads of one (sample, probe), one tensor per leaf) → (units, width) float64 terms.
Reduction = Callable[[Sequence["torch.Tensor"]], "torch.Tensor"]


@dataclass(frozen=True)
class UnitReduction:
    """(gradients of one (sample, probe), one tensor per leaf) → (units, width) float64:
    ``term(unit block of g, unit position)`` stacked over units. It also reduces one leaf on its
    own (:meth:`of_leaf`), which lets :func:`streamed_reduce` drop each weight's gradient as soon
    as autograd has accumulated it."""

    units: Sequence[Any]
    index: Sequence[int]
    term: Callable[[torch.Tensor, int], torch.Tensor]

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack([self.term(unit_block(grads[k], u), i)
                            for i, (u, k) in enumerate(zip(self.units, self.index, strict=True))])

    def of_leaf(self, leaf: int, grad: torch.Tensor) -> dict[int, torch.Tensor]:
        """The terms of the units whose weight is leaf ``leaf`` (column groups share one)."""
        return {i: self.term(unit_block(grad, u), i)
                for i, (u, k) in enumerate(zip(self.units, self.index, strict=True)) if k == leaf}


def unit_reduction(units: Sequence[Any], index: Sequence[int],
                   term: Callable[[torch.Tensor, int], torch.Tensor]) -> UnitReduction:
    """Stack ``term(unit block of g, unit position)`` over units: (units, width) float64."""
    return UnitReduction(units, index, term)


def streamed_reduce(out: torch.Tensor, leaves: Sequence[torch.Tensor], cot: torch.Tensor,
                    reduce: UnitReduction) -> torch.Tensor:
    """``reduce(Jᵀ cot)`` with every weight's gradient reduced the moment autograd has accumulated
    it and then dropped: one weight's gradient is alive at a time, not all of them (the whole
    model's size when every Linear is a unit, as for ``hessian-trace`` on a 1B model). The same
    values as ``torch.autograd.grad`` then ``reduce``; a leaf the output does not reach counts
    as a zero gradient, as ``allow_unused`` does there."""
    import torch

    terms: dict[int, torch.Tensor] = {}

    def hook_for(k: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                terms.update(reduce.of_leaf(k, p.grad.detach()))
            p.grad = None
        return hook

    kept = [t.grad for t in leaves]  # a caller's gradients survive the estimate
    for t in leaves:
        t.grad = None
    handles = [t.register_post_accumulate_grad_hook(hook_for(k)) for k, t in enumerate(leaves)]
    try:
        torch.autograd.backward(out, grad_tensors=cot, retain_graph=True, inputs=list(leaves))
    finally:
        for h in handles:
            h.remove()
        for t, g in zip(leaves, kept, strict=True):
            t.grad = g
    for k, t in enumerate(leaves):
        missing = [i for i, kk in enumerate(reduce.index) if kk == k and i not in terms]
        if missing:
            terms.update(reduce.of_leaf(k, torch.zeros_like(t)))
    return torch.stack([terms[i] for i in range(len(reduce.units))])
