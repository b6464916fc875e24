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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import FormatKind, QuantFormat

if TYPE_CHECKING:
    import torch

__all__ = ["RTNCodes", "fake_quantize", "fake_quantize_int", "quant_error", "quantize_groups", "rtn_codes",
           "rtn_grid"]


def rtn_grid(
    w: torch.Tensor, *, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
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


def fake_quantize_int(
    weight: torch.Tensor, *, bits: int, group_size: int, symmetric: bool
) -> torch.Tensor:
    """RTN fake quantization of a 2-D weight (groups along the input dim, last one may be short)."""
    _check(bits, group_size)
    w = weight.detach().float()
    rows, cols = w.shape
    g = cols if group_size == -1 else min(group_size, cols)
    full = (cols // g) * g
    out = w.clone()
    if full:
        body = w[:, :full].reshape(rows * (full // g), g)
        out[:, :full] = quantize_groups(body, bits=bits, symmetric=symmetric).reshape(rows, full)
    if full < cols:
        out[:, full:] = quantize_groups(w[:, full:], bits=bits, symmetric=symmetric)
    return out.to(weight.dtype)


@dataclass(frozen=True, kw_only=True)
class RTNCodes:
    """``Q(W)`` of a 2-D weight as an integer grid stores it: one uint8 code per weight and a
    scale and zero per group, i.e. ≈ 1 byte per weight instead of 4 for the dequantized copy.

    ``segments`` holds, per run of equal-size groups along the input dim (the full groups, then
    the short last one if any), ``(lo, hi, g, scale, zero)`` with ``scale``/``zero`` shaped
    [rows · (hi − lo)/g, 1] exactly as :func:`quantize_groups` computes them, so
    :meth:`dequantize` repeats its arithmetic and is bit-identical to :func:`fake_quantize_int`.
    """

    codes: torch.Tensor  #: uint8 [rows, cols]
    segments: tuple[tuple[int, int, int, torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        return int(self.codes.numel() * self.codes.element_size() + sum(
            s.numel() * s.element_size() + z.numel() * z.element_size()
            for _, _, _, s, z in self.segments))

    def dequantize(self) -> torch.Tensor:
        """``s · (q − z)`` per group, float32 [rows, cols]."""
        import torch

        rows, cols = self.codes.shape
        out = torch.empty(rows, cols, dtype=torch.float32, device=self.codes.device)
        for lo, hi, g, scale, zero in self.segments:
            q = self.codes[:, lo:hi].reshape(rows * ((hi - lo) // g), g).float()
            out[:, lo:hi] = (scale * (q - zero)).reshape(rows, hi - lo)
        return out


def rtn_codes(weight: torch.Tensor, *, bits: int, group_size: int, symmetric: bool) -> RTNCodes:
    """The codes, scales and zeros of :func:`fake_quantize_int` (same grid, same rounding)."""
    import torch

    _check(bits, group_size)
    w = weight.detach().float()
    rows, cols = w.shape
    g = cols if group_size == -1 else min(group_size, cols)
    full = (cols // g) * g
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    segments = []
    for lo, hi, size in ((0, full, g), (full, cols, cols - full)):
        if hi <= lo:
            continue
        body = w[:, lo:hi].reshape(rows * ((hi - lo) // size), size)
        scale, zero, maxq = rtn_grid(body, bits=bits, symmetric=symmetric)
        q = torch.clamp(torch.round(body / scale) + zero, 0, maxq)
        codes[:, lo:hi] = q.reshape(rows, hi - lo).to(torch.uint8)
        segments.append((lo, hi, size, scale, zero))
    return RTNCodes(codes=codes, segments=tuple(segments))


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
            f"format {fmt.name!r} is a codebook type that RTN cannot emulate; "
            "use an int or k-quant option"
        )
    bits, group, sym = emu
    w2 = weight.detach().reshape(weight.shape[0], -1)
    return fake_quantize_int(w2, bits=bits, group_size=group, symmetric=sym).reshape(weight.shape)


def quant_error(weight: torch.Tensor, fmt: QuantFormat) -> float:
    """‖Q_fmt(W) − W‖²_F, the per-option factor of score-times-error costs (HAWQ-V2 Ω)."""
    w = weight.detach().float()
    return float(((fake_quantize(w, fmt) - w) ** 2).sum())
