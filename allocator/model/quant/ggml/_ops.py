"""Float32 primitives that reproduce ggml's C arithmetic bit for bit (numpy, element-major).

Blocks are laid out **element-major**: an array ``[n, N]`` holds element ``i`` of all ``N``
blocks in row ``i``, so C's per-block loop ``for (i = 0; i < n; ++i)`` becomes a loop over
contiguous rows, each one numpy operation over every block. That makes C's sequential float32
sums exact and cheap (:func:`seq_sum`: one in-place add per element, never numpy's pairwise
``sum``), and per-block values ``[N]`` broadcast against ``[n, N]`` without reshaping.

numpy keeps float32 (Python scalars are cast to float32 first, NEP 50), ``c / t`` is one correctly
rounded division and ``np.sqrt`` is correctly rounded, as C's ``/`` and ``sqrtf``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GROUP_MAX_EPS",
    "f32",
    "first_absmax",
    "first_max",
    "first_min",
    "fp16_round",
    "from_subblocks",
    "nearest_int",
    "per_block",
    "rdiv",
    "roundf",
    "seq_sum",
    "to_subblocks",
]

#: ``GROUP_MAX_EPS`` of ggml-quants.c (1e-15f), as the float32 value C compares against.
GROUP_MAX_EPS = np.float32(1e-15)

_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: adding it leaves the rounded integer in the mantissa


def f32(value: float | np.floating) -> np.float32:
    """``value`` rounded to float32 (a C ``float`` literal)."""
    return np.float32(value)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``bits(v + 12582912f) & 0x7fffff − 0x400000`` (round half to even).

    Reproduces the bit trick itself, so values outside ``|v| ≤ 4194303`` (where C asserts) give
    the same integers as a release build of ggml. int32 out.
    """
    bits = np.add(v, _MAGIC, dtype=np.float32).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` (half away from zero) as float32: ``trunc(v) + sign(v)·[|v − trunc(v)| ≥ ½]``."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` (round to nearest even) as float16."""
    return np.asarray(v, dtype=np.float32).astype(np.float16)


def rdiv(c: float | np.floating, t: np.ndarray) -> np.ndarray:
    """``c / t`` in float32 with ``c`` a C float constant."""
    return np.divide(np.float32(c), t, dtype=np.float32)


def seq_sum(terms: np.ndarray, *, start: np.ndarray | None = None) -> np.ndarray:
    """``s = start; for i: s += terms[i]`` in float32, in C's order (``start`` defaults to 0).

    numpy reduces a C-contiguous ``[n, N]`` array over axis 0 (N ≥ 2) row by row into the
    accumulator — the inner loop runs over the N independent sums, so each is sequential; only
    a reduction along the contiguous axis is pairwise. Anything else takes the explicit loop.
    """
    if start is None and terms.ndim == 2 and terms.shape[1] >= 2 and terms.flags.c_contiguous:
        return np.add(np.float32(0.0), np.add.reduce(terms, axis=0))  # 0 + t0 as C: +0 for −0
    acc = np.zeros(terms.shape[1:], np.float32) if start is None else start.astype(np.float32, copy=True)
    for row in terms:
        acc += row
    return acc


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(amax, max)`` over axis 0 as C's ``if (|v| > amax) {amax = |v|; max = v;}`` loop from 0."""
    amax = np.zeros(x.shape[1:], np.float32)
    mx = np.zeros(x.shape[1:], np.float32)
    for row in x:
        ax = np.abs(row)
        np.copyto(mx, row, where=ax > amax)
        np.maximum(amax, ax, out=amax)
    return amax, mx


def first_min(x: np.ndarray) -> np.ndarray:
    """``m = x[0]; for i: if (x[i] < m) m = x[i];`` (so −0 and +0 keep C's sign)."""
    m = x[0].copy()
    for row in x[1:]:
        np.copyto(m, row, where=row < m)
    return m


def first_max(x: np.ndarray) -> np.ndarray:
    """``m = x[0]; for i: if (x[i] > m) m = x[i];``."""
    m = x[0].copy()
    for row in x[1:]:
        np.copyto(m, row, where=row > m)
    return m


def to_subblocks(xs: np.ndarray, n: int) -> np.ndarray:
    """Block-major rows [S, L] → element-major sub-blocks [n, (L/n)·S]; sub-block j of block s
    is column j·S + s, so a per-sub-block result ``v`` reshapes to ``[L/n, S]`` (:func:`per_block`)."""
    s, length = xs.shape
    return np.ascontiguousarray(xs.reshape(s, length // n, n).transpose(2, 1, 0)).reshape(n, -1)


def from_subblocks(levels: np.ndarray, s: int) -> np.ndarray:
    """Inverse of :func:`to_subblocks`: [n, k·S] → block-major [S, k·n]."""
    n = levels.shape[0]
    return np.ascontiguousarray(levels.reshape(n, -1, s).transpose(2, 1, 0)).reshape(s, -1)


def per_block(v: np.ndarray, s: int) -> np.ndarray:
    """Per-sub-block values [k·S] (from :func:`to_subblocks` columns) → element-major [k, S]."""
    return v.reshape(-1, s)
