"""Round-to-nearest (RTN) fake quantization per group of input channels.

For a weight matrix ``W ∈ R^{out×in}`` and group size ``g`` (``-1`` = one group per row), each
row is split into groups of ``g`` consecutive input channels; every group gets its own grid.

Asymmetric (``maxq = 2^b − 1``):
    s = (max w − min w) / maxq,   z = round(−min w / s),
    Q(w) = s · (clamp(round(w / s) + z, 0, maxq) − z)
Symmetric (GPTQ convention, ``z = (maxq + 1) / 2``, so 2^b levels):
    s = 2 · max|w| / maxq,        Q(w) = s · (clamp(round(w / s) + z, 0, maxq) − z)

These are the grids of the GPTQ reference quantizer (``quant.py``) without its forced inclusion
of zero in the asymmetric range, which only loses resolution. A group whose values are all equal
gets ``s = 1`` so that it is reproduced exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import FormatKind, QuantFormat

if TYPE_CHECKING:
    import torch

__all__ = ["fake_quantize", "fake_quantize_int", "quant_error", "quantize_groups", "rtn_grid"]


def rtn_grid(w: torch.Tensor, *, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scale ``s`` and zero ``z`` per row of ``w`` (shape [rows, g]) and ``maxq``; see module doc."""
    import torch

    maxq = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo = w.amin(dim=1, keepdim=True)
        hi = w.amax(dim=1, keepdim=True)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale))
    flat = scale == 0
    scale = torch.where(flat, torch.ones_like(scale), scale)
    if not symmetric:
        # A constant group: put its value exactly on the grid (q = 0 ↔ w = lo).
        zero = torch.where(flat, torch.round(-w[:, :1] / scale), zero)
    return scale, zero, maxq


def quantize_groups(w: torch.Tensor, *, bits: int, symmetric: bool) -> torch.Tensor:
    """Fake-quantize each row of ``w`` ([rows, g]) on its own RTN grid."""
    import torch

    scale, zero, maxq = rtn_grid(w, bits=bits, symmetric=symmetric)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _check(bits: int, group_size: int) -> None:
    if not 1 <= bits <= 8:
        raise InvalidParameterError(f"RTN bits must be in 1..8, got {bits}")
    if group_size == 0 or group_size < -1:
        raise InvalidParameterError(f"group size must be > 0 or -1 (per channel), got {group_size}")


#: elements quantized at once: groups lie inside rows, so row blocks give the same values while
#: the temporaries of a 128k-vocabulary head (several copies of 1 GB) stay at a few × 64 MiB
CHUNK_ELEMENTS = 2**24


def fake_quantize_int(weight: torch.Tensor, *, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """RTN fake quantization of a 2-D weight (groups along the input dim, last one may be short)."""
    import torch

    _check(bits, group_size)
    rows, cols = weight.shape
    g = cols if group_size == -1 else min(group_size, cols)
    full = (cols // g) * g
    out = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        w = weight.detach()[r0:r0 + step].float()
        n = w.shape[0]
        if full:
            body = w[:, :full].reshape(n * (full // g), g)
            out[r0:r0 + n, :full] = quantize_groups(body, bits=bits, symmetric=symmetric).reshape(n, full)
        if full < cols:
            out[r0:r0 + n, full:] = quantize_groups(w[:, full:], bits=bits, symmetric=symmetric)
    return out


def fake_quantize(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``Q_fmt(W)``: the weight as the format stores it, dequantized (same shape and dtype).

    Conv weights are flattened to [out, in·kh·kw]; float formats round through fp16/bf16; GGUF
    types use the RTN emulation of the catalogue and codebook types are refused.
    """
    import torch

    if fmt.kind is FormatKind.FLOAT or fmt.name in ("f16", "bf16"):
        dtype = torch.bfloat16 if fmt.name in ("bf16",) else torch.float16
        return weight.detach().to(dtype).to(weight.dtype)
    emu = fmt.emulation
    if emu is None:
        raise InvalidParameterError(
            f"format {fmt.name!r} is a codebook type that RTN cannot emulate; use an int or k-quant option"
        )
    bits, group, sym = emu
    w2 = weight.detach().reshape(weight.shape[0], -1)
    return fake_quantize_int(w2, bits=bits, group_size=group, symmetric=sym).reshape(weight.shape)


def quant_error(weight: torch.Tensor, fmt: QuantFormat) -> float:
    """‖Q_fmt(W) − W‖²_F, the per-option factor of score-times-error costs (HAWQ-V2 Ω)."""
    w = weight.detach().float()
    return float(((fake_quantize(w, fmt) - w) ** 2).sum())
