"""Float32 primitives that reproduce ggml's C arithmetic bit for bit (torch, vectorised).

ggml's quantizers run in IEEE float32 with sequential loops; torch's reductions are pairwise or
accumulate in double, and ``c / t`` is computed as ``c * (1 / t)``. Every helper here keeps C's
rounding: sums run element by element in float32 (:func:`seq_sum`), constants are float32 values
formed as C forms them (:func:`f32`), a scalar is divided by a tensor as a tensor (:func:`rdiv`),
and ties of max/min pick the first element as C's ``if (v > m)`` loops do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "GROUP_MAX_EPS",
    "f32",
    "first_absmax",
    "first_max",
    "first_min",
    "fp16_round",
    "nearest_int",
    "rdiv",
    "roundf",
    "seq_sum",
    "sqrtf",
]

#: ``GROUP_MAX_EPS`` of ggml-quants.c (1e-15f), as the float32 value C compares against.
GROUP_MAX_EPS = float(np.float32(1e-15))

_MAGIC = float(np.float32(12582912.0))  # 1.5 * 2^23: adding it leaves the rounded integer in the mantissa


def f32(value: float) -> float:
    """``value`` rounded to float32 (a C ``float`` literal), as a Python float that holds it exactly."""
    return float(np.float32(value))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: ``bits(v + 12582912f) & 0x7fffff − 0x400000`` (round half to even).

    Reproduces the bit trick itself, so values outside ``|v| ≤ 4194303`` (where C asserts) give
    the same integers as a release build of ggml.
    """
    import torch

    bits = (v + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) as float32: ``trunc(v) + sign(v)·[|v − trunc(v)| ≥ ½]``."""
    import torch

    t = torch.trunc(v)
    return torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16`` (round to nearest even) as float16."""
    import torch

    return v.to(torch.float16)


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``, correctly rounded (torch's vectorised float32 ``sqrt`` can be 1 ulp off)."""
    import torch

    return torch.from_numpy(np.sqrt(v.detach().cpu().numpy()))


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` in float32, correctly rounded (torch's ``c / t`` is ``c * (1/t)``, two roundings)."""
    import torch

    return torch.div(torch.full_like(t, c), t)


def seq_sum(terms: torch.Tensor, *, start: torch.Tensor | None = None) -> torch.Tensor:
    """``s = start; for i: s += terms[..., i]`` in float32, in C's order (``start`` defaults to 0)."""
    import torch

    acc = torch.zeros_like(terms[..., 0]) if start is None else start
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` over the last axis as C's ``if (|v| > amax) {amax = |v|; max = v;}`` loop."""
    import torch

    ax = x.abs()
    idx = ax.argmax(dim=-1, keepdim=True)
    amax = ax.gather(-1, idx).squeeze(-1)
    vmax = x.gather(-1, idx).squeeze(-1)
    return amax, torch.where(amax > 0, vmax, 0.0)  # C starts from max = +0.0f


def first_min(x: torch.Tensor) -> torch.Tensor:
    """Minimum over the last axis, the first of equal values (so −0 and +0 keep C's sign)."""
    return x.gather(-1, x.argmin(dim=-1, keepdim=True)).squeeze(-1)


def first_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over the last axis, the first of equal values."""
    return x.gather(-1, x.argmax(dim=-1, keepdim=True)).squeeze(-1)
