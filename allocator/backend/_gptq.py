"""GPTQ's block-by-block stage order for :func:`~allocator.backend.apply_plan`.

The algorithm itself (:func:`gptq_quantize`, :class:`HessianAccumulator`, :func:`collect_hessians`)
is :mod:`allocator.model.quant.gptq`, shared with the estimators and the refiner
(:class:`allocator.model.quant.GptqQuantizer`); import it from there.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["block_stages"]


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
