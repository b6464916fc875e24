"""Per-unit GPTQ that learns from a reference plan as the backend applies it
(:func:`gptq_quantizer_as_applied`, the quantizer of ``run --method gptq``, docs/quantizer.md).

It lives in the backend because it runs the backend's block-by-block GPTQ
(:func:`~allocator.backend.apply_plan`) to record the Hessians the per-unit quantizer
(:class:`allocator.model.quant.GptqQuantizer`) then uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from allocator.model.quant.quantizer import DEFAULT_CACHE_BYTES

if TYPE_CHECKING:
    import torch

    from allocator.core.plan import BitPlan
    from allocator.core.units import Unit
    from allocator.model.quant.gptq import GptqConfig
    from allocator.model.quant.quantizer import GptqQuantizer

__all__ = ["gptq_quantizer_as_applied"]


def gptq_quantizer_as_applied(model: torch.nn.Module, units: Sequence[Unit],
                              batches: Sequence[Mapping[str, Any]], reference: BitPlan, *,
                              config: GptqConfig | None = None,
                              cache_bytes: int | None = DEFAULT_CACHE_BYTES) -> GptqQuantizer:
    """A :class:`GptqQuantizer` whose Hessians are the ones the backend's block-by-block GPTQ
    uses when it applies ``reference`` on ``batches``: module m's ``H`` comes from the inputs of
    the model whose earlier blocks already hold ``reference``'s GPTQ weights.

    So the per-unit quantizer gives ``reference`` (the uniform plan that fits, in ``run``)
    exactly as :func:`allocator.backend.apply_plan` applies it, and plans that differ from it in
    a few units nearly so: every plan is then measured against the real uniform plan. Costs one
    GPTQ application of ``reference``; the model's weights are restored before returning.

    Raises:
        InvalidParameterError: no batches, or a unit whose module is not Linear-like.
    """
    import torch

    from allocator.backend._apply import apply_plan
    from allocator.backend._resolve import module_weight
    from allocator.model.output_store import TensorStash
    from allocator.model.quant.gptq import GptqConfig
    from allocator.model.quant.quantizer import GptqQuantizer, gptq_modules, shared_hessians

    weights = {m: module_weight(model, m) for m in gptq_modules(model, units, batches)}
    stash = TensorStash(weights)  # on disk: not a second copy of the weights in memory
    hessians: dict[str, torch.Tensor] = {}
    cfg = config or GptqConfig()
    try:
        apply_plan(model, reference, method="gptq", calibration=list(batches), units=units,
                   blocksize=cfg.blocksize, percdamp=cfg.percdamp, static_groups=cfg.static_groups,
                   on_hessian=hessians.__setitem__)
    finally:
        with torch.no_grad():
            for m, w in weights.items():
                w.copy_(stash[m])
    what = ", ".join(sorted(set(reference.choice.values())))
    return GptqQuantizer(shared_hessians(hessians), config=cfg, cache_bytes=cache_bytes,
                         inputs=f"as applied under {what}", reference=dict(reference.choice))
