"""The float32 primitives of the ggml port: C's sequential sums, nearest_int, signed zeros."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.model.quant.ggml._ops import first_absmax, nearest_int, seq_sum


def _c_sum(terms: np.ndarray) -> np.ndarray:
    acc = np.zeros(terms.shape[1:], np.float32)
    for i in range(terms.shape[0]):
        acc = (acc + terms[i]).astype(np.float32)
    return acc


@pytest.mark.parametrize("shape", [(32, 1), (32, 2), (16, 3), (256, 7), (32, 4096), (8, 100000)])
def test_seq_sum_is_cs_sequential_float32_sum(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * shape[1])
    # mixed magnitudes: any pairwise or double accumulation would differ in the last bits
    terms = (rng.standard_normal(shape) * rng.choice([1e-4, 1.0, 1e4], size=shape)).astype(np.float32)
    assert np.array_equal(seq_sum(terms), _c_sum(terms))
    assert np.array_equal(seq_sum(np.asfortranarray(terms)), _c_sum(terms))
    start = rng.standard_normal(shape[1]).astype(np.float32)
    assert np.array_equal(seq_sum(terms, start=start), _c_sum(np.vstack([start[None], terms])))


def test_seq_sum_of_negative_zeros_is_positive_zero_as_in_c() -> None:
    terms = np.full((4, 3), -0.0, np.float32)
    assert not np.signbit(seq_sum(terms)).any()
    assert not np.signbit(seq_sum(terms[:, :1])).any()


def test_nearest_int_rounds_half_to_even_and_keeps_the_bit_trick_out_of_range() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -7.51], np.float32)
    assert nearest_int(v).tolist() == [0, 2, 2, 0, -2, 3, -8]
    far = np.array([5e6, -1e8], np.float32)
    bits = (far + np.float32(12582912.0)).view(np.int32)
    assert nearest_int(far).tolist() == ((bits & 0x7FFFFF) - 0x400000).tolist()


def test_first_absmax_takes_the_first_of_equal_magnitudes() -> None:
    x = np.array([[1.0, 0.0], [-1.0, -0.0], [0.5, 0.0]], np.float32)
    amax, mx = first_absmax(x)
    assert amax.tolist() == [1.0, 0.0] and mx.tolist() == [1.0, 0.0]
    assert not np.signbit(mx[1])  # C starts from max = +0.0f
