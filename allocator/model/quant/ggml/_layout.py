"""GGUF block layouts (ggml-common.h): byte packing helpers and ggml's ``dequantize_row_*``.

A block is a row of ``block_bytes`` uint8 values; fields are laid out as the C structs
(``ggml_half`` little-endian). Dequantization repeats ggml's float32 expressions, e.g. q4_K
``y = (d·sc)·q − (dmin·m)``, so our values equal what ggml and gguf-py read from the bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "IQ4NL_VALUES",
    "bits_to_bytes",
    "fp16_bytes",
    "half_at",
    "k_scale_min",
    "pack_2bit",
    "pack_nibbles",
    "unpack_2bit",
    "unpack_bits",
    "unpack_nibbles",
]

#: ``kvalues_iq4nl`` of ggml-common.h.
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def fp16_bytes(h: torch.Tensor) -> torch.Tensor:
    """float16 values [N] → their little-endian bytes [N, 2]."""
    import torch

    bits = h.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)


def half_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The ``ggml_half`` at byte ``offset`` of each block, as float32 [N]."""
    import torch

    lo = blocks[:, offset].to(torch.int32)
    hi = blocks[:, offset + 1].to(torch.int32)
    bits = lo | (hi << 8)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16).float()


def pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``lo | hi << 4`` as bytes (ints already below 16 where C relies on it)."""
    import torch

    return ((lo | (hi << 4)) & 0xFF).to(torch.uint8)


def unpack_nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes → (low nibble, high nibble) as int32."""
    import torch

    v = b.to(torch.int32)
    return v & 0xF, v >> 4


def bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """0/1 ints [N, 8k] → bytes [N, k], bit b of byte i = element 8i + b (little-endian words)."""
    import torch

    shifts = torch.arange(8, dtype=torch.int32)
    return (bits.reshape(bits.shape[0], -1, 8) << shifts).sum(-1).to(torch.uint8)


def unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bits_to_bytes`: bytes [N, k] → bits [N, 8k] as int32."""
    import torch

    shifts = torch.arange(8, dtype=torch.int32)
    return ((b.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


def pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """K-quant 2-bit packing of [N, 256] levels (bits 0–1 only): for each 128 half, byte l holds
    levels l, l+32, l+64, l+96 at shifts 0, 2, 4, 6 → [N, 64]."""
    import torch

    q = (levels & 3).reshape(levels.shape[0], 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return (q << shifts).sum(2).reshape(levels.shape[0], 64).to(torch.uint8)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: [N, 64] bytes → [N, 256] levels 0–3."""
    import torch

    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    q = (qs.to(torch.int32).reshape(qs.shape[0], 2, 1, 32) >> shifts) & 3
    return q.reshape(qs.shape[0], 256)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0 … 7 of 12 packed bytes [N, 12] → (sc, m) [N, 8] int32."""
    import torch

    q = scales.to(torch.int32)
    lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    hi_sc = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], dim=1), torch.cat([lo_m, hi_m], dim=1)
