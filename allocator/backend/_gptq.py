"""GPTQ for the backend: the algorithm lives on the model side, the block order here.

The pure algorithm (:func:`gptq_quantize`, :class:`HessianAccumulator`, :func:`hinv_cholesky`,
:func:`column_formats`, :func:`collect_hessians`) is :mod:`allocator.model.quant.gptq`, so that the
estimators and the refiner can run the same GPTQ as the plan's quantizer
(:class:`allocator.model.quant.GptqQuantizer`); this module re-exports it for the backend and
adds the block-by-block stage order of :func:`~allocator.backend.apply_plan`.
"""

from __future__ import annotations

from collections.abc import Sequence

from allocator.model.quant.gptq import (
    ColumnFormats,
    GptqConfig,
    HessianAccumulator,
    collect_hessians,
    column_formats,
    gptq_quantize,
    hinv_cholesky,
)

__all__ = ["ColumnFormats", "GptqConfig", "HessianAccumulator", "block_stages", "collect_hessians",
           "column_formats", "gptq_quantize", "hinv_cholesky"]


def block_stages(module_names: Sequence[str]) -> list[list[str]]:
    """Modules grouped by transformer block (name prefix up to the first numeric part), in order.

    Modules outside any numbered block (heads, poolers) form the last stage, so every stage sees
    the inputs produced by the already quantized earlier blocks, as the reference's sequential
    driver does.
    """
    import re

    stages: dict[str, list[str]] = {}
    tail: list[str] = []
    for name in module_names:
        m = re.match(r"^(.*?\.\d+)\.", name)
        if m is None:
            tail.append(name)
        else:
            stages.setdefault(m[1], []).append(name)
    out = list(stages.values())
    return out + [tail] if tail else out
