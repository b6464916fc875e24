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


def stream_inputs(model: torch.nn.Module, modules: Sequence[str], batches: Sequence[Mapping[str, Any]],
                  forward: Callable[[Mapping[str, Any]], Any],
                  on_rows: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``forward`` over every batch with input hooks on ``modules``; ``on_rows(name, x)``
    gets each call's input (detached). When the input is [B, T, in] and the batch has an
    attention mask of [B, T], only the real tokens' rows are passed ([n, in])."""
    import torch

    current: dict[str, Any] = {}

    def hook(name: str) -> Callable[..., None]:
        def add(_mod: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].detach()
            mask = current.get("mask")
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            on_rows(name, x)
        return add

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                forward(batch)
    finally:
        for h in handles:
            h.remove()
