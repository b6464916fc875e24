"""GGUF block layouts (ggml-common.h): byte packing helpers and ggml's ``dequantize_row_*``.

A block is a row of ``block_bytes`` uint8 values (numpy, block-major ``[N, block_bytes]``);
fields are laid out as the C structs (``ggml_half`` little-endian). Dequantization repeats
ggml's float32 expressions, e.g. q4_K ``y = (d·sc)·q − (dmin·m)``, so our values equal what ggml
and gguf-py read from the bytes.
"""

from __future__ import annotations

import numpy as np

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

_SHIFT8 = np.arange(8, dtype=np.int32)
_SHIFT4x2 = np.array([0, 2, 4, 6], dtype=np.int32).reshape(1, 1, 4, 1)


def fp16_bytes(h: np.ndarray) -> np.ndarray:
    """float16 values [N] → their little-endian bytes [N, 2]."""
    return np.ascontiguousarray(h, dtype="<f2").view(np.uint8).reshape(-1, 2)


def half_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The ``ggml_half`` at byte ``offset`` of each block, as float32 [N]."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view("<f2").reshape(-1).astype(np.float32)


def pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``lo | hi << 4`` as bytes (ints already below 16 where C relies on it)."""
    return ((lo | (hi << 4)) & 0xFF).astype(np.uint8)


def unpack_nibbles(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes → (low nibble, high nibble) as int32."""
    v = b.astype(np.int32)
    return v & 0xF, v >> 4


def bits_to_bytes(bits: np.ndarray) -> np.ndarray:
    """0/1 ints [N, 8k] → bytes [N, k], bit b of byte i = element 8i + b (little-endian words)."""
    return (bits.reshape(bits.shape[0], -1, 8) << _SHIFT8).sum(-1).astype(np.uint8)


def unpack_bits(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`bits_to_bytes`: bytes [N, k] → bits [N, 8k] as int32."""
    return ((b.astype(np.int32)[..., None] >> _SHIFT8) & 1).reshape(b.shape[0], -1)


def pack_2bit(levels: np.ndarray) -> np.ndarray:
    """K-quant 2-bit packing of [N, 256] levels (bits 0–1 only): for each 128 half, byte l holds
    levels l, l+32, l+64, l+96 at shifts 0, 2, 4, 6 → [N, 64]."""
    q = (levels & 3).reshape(levels.shape[0], 2, 4, 32)
    return (q << _SHIFT4x2).sum(2).reshape(levels.shape[0], 64).astype(np.uint8)


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_2bit`: [N, 64] bytes → [N, 256] levels 0–3."""
    q = (qs.astype(np.int32).reshape(qs.shape[0], 2, 1, 32) >> _SHIFT4x2) & 3
    return q.reshape(qs.shape[0], 256)


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0 … 7 of 12 packed bytes [N, 12] → (sc, m) [N, 8] int32."""
    q = scales.astype(np.int32)
    lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    hi_sc = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], axis=1), np.concatenate([lo_m, hi_m], axis=1)
