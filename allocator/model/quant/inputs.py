"""The inputs a quantizer learns from: every token row that reaches a module on calibration data.

GPTQ's Hessians (``H = 2XXᵀ/n``) and llama.cpp's importance matrix (``imp_j = Σ_t x_tj² / T``)
are both sums over these rows; :func:`stream_inputs` runs the forward passes once and hands each
module's rows to the caller, padding dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["stream_inputs"]


class _Enough(Exception):  # noqa: N818  (a signal, not an error)
    """Raised inside a forward once every hooked module has had its input: the rest of it
    (later blocks, a vocabulary-wide head) would compute nothing that is read."""


def stream_inputs(model: torch.nn.Module, modules: Sequence[str], batches: Sequence[Mapping[str, Any]],
                  forward: Callable[[Mapping[str, Any]], Any],
                  on_rows: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``forward`` over every batch with input hooks on ``modules``; ``on_rows(name, x)``
    gets each call's input (detached). When the input is [B, T, in] and the batch has an
    attention mask of [B, T], only the real tokens' rows are passed ([n, in]).

    When a probe forward on one short sample calls every module exactly once, each batch's
    forward stops as soon as the last of them has its input: block-by-block GPTQ then runs half
    the model per stage on average, and no batch computes a causal LM's logits. Otherwise
    (shared modules called twice, routed experts) every forward runs to the end.
    """
    import torch

    current: dict[str, Any] = {}
    wanted = set(modules)
    pending: set[str] = set()
    stop = bool(batches) and _called_once(model, wanted, batches[0], forward)

    def hook(name: str) -> Callable[..., None]:
        def add(_mod: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].detach()
            mask = current.get("mask")
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            on_rows(name, x)
            pending.discard(name)
            if stop and not pending:
                raise _Enough
        return add

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in wanted]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                pending.update(wanted)
                try:
                    forward(batch)
                except _Enough:
                    pass
    finally:
        for h in handles:
            h.remove()


def _called_once(model: torch.nn.Module, modules: set[str], batch: Mapping[str, Any],
                 forward: Callable[[Mapping[str, Any]], Any]) -> bool:
    """Whether a forward of one short sample of ``batch`` calls each of ``modules`` exactly once."""
    import torch

    from allocator.model.outputs import probe_batch

    calls = dict.fromkeys(modules, 0)

    def count(name: str) -> Callable[..., None]:
        def add(_mod: torch.nn.Module, _inp: Any) -> None:
            calls[name] += 1
        return add

    handles = [model.get_submodule(m).register_forward_pre_hook(count(m)) for m in modules]
    try:
        with torch.no_grad():
            forward(probe_batch(batch))
    finally:
        for h in handles:
            h.remove()
    return all(n == 1 for n in calls.values())
