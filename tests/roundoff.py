"""Tolerances that follow float32 arithmetic, for comparing distortions computed by two paths.

Two float32 evaluations of one model on the same rows (other batch shapes, other chunking, options
stacked along the batch) sum in other orders, so their outputs differ by round-off. A distortion
between a reference output and a perturbed one (1 − cos of embeddings, KL of logits, MSE) is
second order in the perturbation δ: d ≈ ½‖δ‖². Output round-off r (‖r‖ ≤ ρ on each of the two
outputs) moves it by ⟨δ, r_b − r_a⟩ + ½‖r_b − r_a‖² ≤ 2·√(2d)·ρ + 2ρ². A small distortion (an
int8 cost of 3e-7) is therefore resolved only to about √d·ρ, far coarser than a relative
tolerance on d itself: these helpers give that absolute floor, which a test adds to its
relative tolerance (the relative part still governs the large costs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: float32 machine epsilon (2⁻²³)
F32_EPS = float(np.finfo(np.float32).eps)


def output_roundoff(width: int, scale: float = 1.0) -> float:
    """ρ: round-off of a float32 output vector of magnitude ``scale``, its elements being sums of
    ``width`` products (the hidden width): a sum of n terms in another order differs by about
    √n·ε of its magnitude."""
    return math.sqrt(width) * F32_EPS * scale


def quadratic_atol(value: Any, rho: float) -> Any:
    """Absolute tolerance on a distortion ``value`` (≈ ½‖δ‖², scalar or array) computed from two
    outputs each known to ±``rho``: 2·√(2·value)·ρ + 2ρ²."""
    v = np.maximum(np.asarray(value, dtype=float), 0.0)
    out = 2.0 * np.sqrt(2.0 * v) * rho + 2.0 * rho**2
    return float(out) if out.ndim == 0 else out


def mean_std_atol(value: Any, n_batches: int, rho: float) -> Any:
    """Absolute tolerance on the standard error of ``n_batches`` per-batch means whose mean is
    ``value``: each batch mean (≤ n·value, distortions being ≥ 0) moves by at most
    ``quadratic_atol(n·value)``, and the standard error of n values by at most that / √(n − 1)."""
    return quadratic_atol(n_batches * np.asarray(value, dtype=float), rho) / math.sqrt(max(n_batches - 1, 1))


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: Any) -> None:
    """|actual − expected| ≤ atol + rtol·|expected| elementwise (``np.testing.assert_allclose``
    with an ``atol`` that may be an array, one floor per value)."""
    a, e = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    bound = np.asarray(atol, dtype=float) + rtol * np.abs(e)
    bound = np.broadcast_to(bound, e.shape)
    bad = ~(np.abs(a - e) <= bound)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} values differ by more than their "
                           f"tolerance: actual {a[bad][:5]}, expected {e[bad][:5]}, "
                           f"tolerance {bound[bad][:5]}")
