"""The 32-weight block types q4_0, q4_1, q5_0, q5_1, q8_0 (ggml-quants.c), bytes in and out.

Without importance weights these are ggml's ``quantize_row_*_ref``: a scale from the block's
extreme values and one rounding (``(int8_t)(x·id + 8.5f)`` truncates, q8_0 uses ``roundf``).
With them, ``quantize_row_*_impl``: weights w = qw·√(σ² + x²) (σ² = the row's mean square) and
ggml's scale search (``make_qx_quants`` for the symmetric types, ``make_qkx3_quants`` for the
ones with a min). q8_0 ignores importance, as ggml does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from allocator.model.quant.ggml._layout import (
    bits_to_bytes,
    fp16_bytes,
    half_at,
    pack_nibbles,
    unpack_bits,
    unpack_nibbles,
)
from allocator.model.quant.ggml._ops import first_absmax, first_max, first_min, fp16_round, roundf
from allocator.model.quant.ggml._search import make_qkx_quants, make_qx_quants

if TYPE_CHECKING:
    import torch

__all__ = ["dequantize_legacy", "quantize_legacy"]


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``id = d ? 1.0f/d : 0.0f``."""
    import torch

    return torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _trunc_codes(v: torch.Tensor) -> torch.Tensor:
    """C's float → integer conversion (truncation toward zero)."""
    import torch

    return torch.trunc(v).to(torch.int32)


def _nibbles_and_high(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32 levels → 16 ``qs`` bytes (element j low, j + 16 high) and the 4 ``qh`` bytes (bit 4)."""
    qs = pack_nibbles(levels[:, :16] & 0xF, levels[:, 16:] & 0xF)
    return qs, bits_to_bytes((levels >> 4) & 1)


def _ref_codes(
    blocks: torch.Tensor, ggml_type: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``quantize_row_<type>_ref``: (d, min or None, levels) per block."""
    import torch

    if ggml_type in ("q4_0", "q5_0"):
        half = 8 if ggml_type == "q4_0" else 16
        _, mx = first_absmax(blocks)
        d = mx / float(-half)
        codes = _trunc_codes(blocks * _inv(d).unsqueeze(-1) + (half + 0.5))
        return d, None, codes.clamp(max=2 * half - 1)
    if ggml_type in ("q4_1", "q5_1"):
        nmax = 15 if ggml_type == "q4_1" else 31
        lo, hi = first_min(blocks), first_max(blocks)
        d = (hi - lo) / float(nmax)
        codes = _trunc_codes((blocks - lo.unsqueeze(-1)) * _inv(d).unsqueeze(-1) + 0.5)
        return d, lo, codes.clamp(max=15) if nmax == 15 else codes & 0xFF
    amax = blocks.abs().amax(dim=-1)  # q8_0
    d = amax / 127.0
    return d, None, roundf(blocks * _inv(d).unsqueeze(-1)).to(torch.int32)


def _impl_codes(
    blocks: torch.Tensor, ggml_type: str, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``quantize_row_<type>_impl`` with importance: (d, min or None, levels) per block."""
    if ggml_type in ("q4_0", "q5_0"):
        d, levels = make_qx_quants(blocks, 8 if ggml_type == "q4_0" else 16, weights)
        return d, None, levels
    nmax = 15 if ggml_type == "q4_1" else 31
    d, the_min, levels = make_qkx_quants(
        blocks, weights, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
    )
    return d, -the_min, levels


def quantize_legacy(blocks: torch.Tensor, ggml_type: str, weights: torch.Tensor | None) -> torch.Tensor:
    """Blocks [N, 32] (and the _impl weights w, or None for _ref) → GGUF block bytes [N, size]."""
    import torch

    if weights is None or ggml_type == "q8_0":
        d, vmin, levels = _ref_codes(blocks, ggml_type)
    else:
        d, vmin, levels = _impl_codes(blocks, ggml_type, weights)
    parts = [fp16_bytes(fp16_round(d))]
    if vmin is not None:
        parts.append(fp16_bytes(fp16_round(vmin)))
    if ggml_type == "q8_0":
        parts.append((levels & 0xFF).to(torch.uint8))
    elif ggml_type in ("q4_0", "q4_1"):
        parts.append(pack_nibbles(levels[:, :16] & 0xF, levels[:, 16:] & 0xF))
    else:
        qs, qh = _nibbles_and_high(levels)
        parts += [qh, qs]
    return torch.cat(parts, dim=1)


def dequantize_legacy(data: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """``dequantize_row_<type>``: block bytes [N, size] → float32 weights [N, 32]."""
    import torch

    d = half_at(data, 0).unsqueeze(-1)
    if ggml_type == "q8_0":
        return data[:, 2:].view(torch.int8).float() * d
    has_min = ggml_type in ("q4_1", "q5_1")
    start = 4 if has_min else 2
    if ggml_type in ("q5_0", "q5_1"):
        high = unpack_bits(data[:, start : start + 4]) << 4
        start += 4
    else:
        high = torch.zeros((data.shape[0], 32), dtype=torch.int32)
    lo, hi = unpack_nibbles(data[:, start : start + 16])
    q = torch.cat([lo, hi], dim=1) | high
    if has_min:
        return q.float() * d + half_at(data, 2).unsqueeze(-1)
    return (q - (8 if ggml_type == "q4_0" else 16)).float() * d
