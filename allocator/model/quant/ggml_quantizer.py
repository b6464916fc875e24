"""llama.cpp's own quantizers as the plan's quantizer: ``GgmlQuantizer`` (name ``ggml``).

A GGUF option (``q4_K``, ``q8_0``, ``iq4_nl`` …, :data:`allocator.model.quant.GGML_BLOCKS`) is
quantized with ggml's exact algorithm (:func:`allocator.model.quant.quantize_ggml`), so costs,
refinement and evaluation see the weights llama.cpp would write; any other option (int*, fp16,
a GGUF type this package does not quantize, or a row length the type's block does not divide)
falls back to round to nearest (:func:`allocator.model.quant.fake_quantize`).

Importance (llama.cpp's imatrix): per module, the mean squared input activation of every input
column, ``imp_j = Σ_t x_tj² / T`` over the calibration tokens (padding skipped) — the diagonal
of the input Hessian ``H = 2XXᵀ/T`` up to the factor 2, to which ggml's searches are invariant
only up to rounding, so the imatrix convention (no factor) is kept. With it ggml runs its
``quantize_row_<type>_impl`` searches, as ``llama-quantize --imatrix`` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import FormatKind, QuantFormat
from allocator.model.quant.inputs import stream_inputs

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit

__all__ = ["GgmlQuantizer", "collect_importance", "ggml_quantizer", "ggml_values"]


def ggml_values(weight: torch.Tensor, fmt: QuantFormat,
                importance: torch.Tensor | None = None) -> torch.Tensor:
    """``Q_fmt(W)`` with ggml's exact quantizer for a GGUF ``fmt`` whose block divides the rows
    (``importance``: one value per input column, or None), else RTN; shape, dtype and device of W."""
    from allocator.model.quant.ggml import GGML_BLOCKS, quantize_ggml
    from allocator.model.quant.rtn import fake_quantize

    w2 = weight.detach().reshape(weight.shape[0], -1)
    spec = GGML_BLOCKS.get(fmt.name) if fmt.kind is FormatKind.GGUF else None
    if spec is None or w2.shape[1] % spec.block:
        return fake_quantize(weight, fmt)
    imp = None if importance is None else importance.detach().reshape(-1)
    q = quantize_ggml(w2, spec.name, importance=imp).values
    return q.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)


class GgmlQuantizer:
    """ggml's quantizer for GGUF options, RTN for the others (module doc), cached per
    (unit, option).

    Args:
        importance: module name → mean squared input activation per input column (the imatrix
            entry), or None (ggml's ``_ref`` quantizers, as ``llama-quantize`` without --imatrix).
            A column-group unit ``m[g=i]`` takes the slice of its columns.
        cache_bytes: bytes of results kept (least recently used dropped first); None: all.

    ``computed`` counts quantizations and ``hits`` cache hits.
    """

    name = "ggml"

    def __init__(self, importance: Mapping[str, torch.Tensor] | None = None, *,
                 cache_bytes: int | None = 2 << 30) -> None:
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 0):
            raise InvalidParameterError(f"ggml cache_bytes must be an int ≥ 0 or None, got {cache_bytes!r}")
        self.importance = dict(importance) if importance is not None else None
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._held = 0
        self.computed = 0
        self.hits = 0

    def __repr__(self) -> str:
        imp = "no importance" if self.importance is None else f"importance for {len(self.importance)} modules"
        return f"GgmlQuantizer({imp})"

    def importance_of(self, unit: Unit, columns: int) -> torch.Tensor | None:
        """The unit's imatrix entry (its column slice for a group unit), or None."""
        if self.importance is None or unit.module not in self.importance:
            return None
        imp = self.importance[unit.module].reshape(-1)
        if unit.columns is not None and imp.numel() != columns:
            imp = imp[unit.columns[0]:unit.columns[1]]
        if imp.numel() != columns:
            raise InvalidParameterError(
                f"unit {unit.name!r}: {columns} input columns but the importance of {unit.module!r} "
                f"has {imp.numel()}; was the quantizer built for this model?")
        return imp

    def quantize(self, unit: Unit, weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        key = (unit.name, fmt.name)
        got = self._cache.get(key)
        if got is not None and tuple(got.shape) == tuple(weight.shape) and got.dtype == weight.dtype:
            self._cache.move_to_end(key)
            self.hits += 1
            return got
        cols = int(weight.reshape(weight.shape[0], -1).shape[1])
        q = ggml_values(weight, fmt, self.importance_of(unit, cols) if fmt.kind is FormatKind.GGUF else None)
        self.computed += 1
        size = q.numel() * q.element_size()
        if self.cache_bytes is None or size <= self.cache_bytes:
            self._cache[key] = q
            self._held += size
            while self.cache_bytes is not None and self._held > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._held -= old.numel() * old.element_size()
        return q

    def clear(self) -> None:
        """Drop the cached results (the importance stays)."""
        self._cache.clear()
        self._held = 0


def collect_importance(model: torch.nn.Module, modules: Sequence[str], batches: Sequence[Mapping[str, Any]],
                       forward: Callable[[Mapping[str, Any]], Any]) -> dict[str, torch.Tensor]:
    """``imp_j = Σ_t x_tj² / T`` of every module's input over ``batches`` (float32 [in]).

    Input hooks see each token's input row (the attention mask drops padding when the input is
    [B, T, in]); llama.cpp's imatrix tool accumulates the same sums over its calibration text.
    """

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(modules, 0)

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        s = (x * x).sum(0)
        sums[name] = s if name not in sums else sums[name] + s
        counts[name] += int(x.shape[0])

    stream_inputs(model, modules, batches, forward, add)
    return {m: (sums[m] / max(counts[m], 1)).float().cpu() for m in modules if m in sums}


def ggml_quantizer(model: torch.nn.Module | None, units: Sequence[Unit],
                   batches: Sequence[Mapping[str, Any]] = (), *, kind: str = "generic",
                   importance: bool = True, cache_bytes: int | None = 2 << 30) -> GgmlQuantizer:
    """A :class:`GgmlQuantizer` for ``units``; with ``importance`` (default) and calibration
    ``batches``, one full-precision pass collects the imatrix of the units' Linear modules."""
    from allocator.core.units import get_module, is_linear_like
    from allocator.model.outputs import model_inputs

    if not importance or not batches or model is None:
        return GgmlQuantizer(None, cache_bytes=cache_bytes)
    modules = [m for m in dict.fromkeys(u.module for u in units) if is_linear_like(get_module(model, m))]
    imp = collect_importance(model, modules, batches, lambda b: model(**model_inputs(b, kind)))
    return GgmlQuantizer(imp, cache_bytes=cache_bytes)
