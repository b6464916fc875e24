"""Bootstrap intervals over evaluation samples: hand computations, a known distribution, pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from allocator.backend import (
    Contrast,
    RatioMetric,
    SampleStats,
    Transform,
    metric_intervals,
    paired_comparison,
    percentile_interval,
    resamples,
)
from allocator.core.errors import InvalidParameterError


def _mean(values: np.ndarray, *, higher_is_better: bool = False) -> SampleStats:
    """The plain mean of one value per sample, as a ratio of sums (Σ v_i / Σ 1)."""
    return SampleStats(columns={"v": values, "one": np.ones(len(values))},
                       metrics={"m": RatioMetric(numerator="v", denominator="one",
                                                 higher_is_better=higher_is_better)})


def test_ratio_of_sums_and_transforms_by_hand() -> None:
    s = SampleStats(columns={"a": np.array([1.0, 3.0]), "b": np.array([2.0, 2.0]),
                             "z": np.array([0.0, 1.0])},
                    metrics={"r": RatioMetric(numerator="a", denominator="b"),
                             "e": RatioMetric(numerator="a", denominator="b", transform=Transform.EXP),
                             "c": RatioMetric(numerator="a", denominator="b",
                                              transform=Transform.COMPLEMENT),
                             "z": RatioMetric(numerator="a", denominator="z")})
    assert s.n == 2 and s.value("r") == 1.0 and s.value("e") == pytest.approx(math.e)
    assert s.value("c") == 0.0
    idx = np.array([[0, 0], [1, 1], [0, 1]])
    assert np.asarray(s.value("r", idx)) == pytest.approx([0.5, 1.5, 1.0])  # (1+1)/4, (3+3)/4, 4/4
    assert np.asarray(s.value("e", idx)) == pytest.approx(np.exp([0.5, 1.5, 1.0]))
    # a resample without a counted sample has no value (NaN), not 0
    z = np.asarray(s.value("z", idx))
    assert math.isnan(z[0]) and z[1:] == pytest.approx([3.0, 4.0])
    assert s.values() == {"r": 1.0, "e": pytest.approx(math.e), "c": 0.0, "z": 4.0}


def test_sample_stats_refuse_inconsistent_columns() -> None:
    with pytest.raises(InvalidParameterError, match="length"):
        SampleStats(columns={"a": np.ones(1), "b": np.ones(2)}, metrics={})
    with pytest.raises(InvalidParameterError, match="columns"):
        SampleStats(columns={"a": np.ones(1)}, metrics={"m": RatioMetric(numerator="a", denominator="b")})
    with pytest.raises(InvalidParameterError, match="no metric"):
        _mean(np.ones(3)).value("x")


def test_resamples_are_deterministic_given_the_seed() -> None:
    a, b, c = resamples(7, 50, seed=3), resamples(7, 50, seed=3), resamples(7, 50, seed=4)
    assert a.shape == (50, 7) and a.min() >= 0 and a.max() <= 6
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(InvalidParameterError):
        resamples(0, 10)


def test_percentile_interval_by_hand() -> None:
    # numpy's linear percentile of 1..1000: position q·999 from the first value
    ci = percentile_interval(500.0, np.arange(1.0, 1001.0))
    assert (ci.value, ci.lo, ci.hi) == (500.0, pytest.approx(1 + 0.025 * 999), pytest.approx(1 + 0.975 * 999))
    narrow = percentile_interval(500.0, np.arange(1.0, 1001.0), level=0.5)
    assert narrow.lo == pytest.approx(1 + 0.25 * 999) and narrow.hi == pytest.approx(1 + 0.75 * 999)
    # NaN replicates (no counted sample drawn) are left out
    ci = percentile_interval(1.0, np.array([np.nan, 1.0, 1.0]))
    assert ci.to_dict() == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    with pytest.raises(InvalidParameterError):
        percentile_interval(1.0, np.ones(3), level=1.0)


def test_interval_of_a_mean_matches_the_normal_theory() -> None:
    # the bootstrap interval of a mean of n normal draws: about ±1.96 σ/√n around it
    rng = np.random.default_rng(0)
    n, sigma = 400, 2.0
    x = rng.normal(5.0, sigma, size=n)
    ci = metric_intervals(_mean(x), resamples(n, 2000, seed=1))["m"]
    half = 1.96 * x.std(ddof=1) / math.sqrt(n)
    assert ci.value == pytest.approx(x.mean())
    assert ci.lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert ci.hi == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert ci.lo < 5.0 < ci.hi


def _width(lo: float, hi: float) -> float:
    return hi - lo


def test_paired_interval_is_tighter_than_unpaired_on_correlated_samples() -> None:
    # texts differ a lot in difficulty (d); plan A is 5 % worse than plan B on every text
    rng = np.random.default_rng(0)
    n = 64
    d = rng.lognormal(0.0, 1.0, size=n)
    a, b = _mean(d * 1.05 * rng.normal(1, 0.01, n)), _mean(d * rng.normal(1, 0.01, n))
    idx = resamples(n, 1000, seed=0)
    c = paired_comparison(a, b, idx)["m"]
    assert c.contrast is Contrast.RATIO and c.delta.value == pytest.approx(1.05, abs=0.01)
    # unpaired: A and B resampled independently
    unpaired = percentile_interval(c.delta.value, np.asarray(a.value("m", idx))
                                   / np.asarray(b.value("m", resamples(n, 1000, seed=1))))
    assert _width(c.delta.lo, c.delta.hi) < 0.1 * _width(unpaired.lo, unpaired.hi)
    # the pairing sees that A is worse; the separate intervals overlap and cannot
    assert c.worse and not c.better and c.verdict == "worse"
    assert unpaired.lo < 1.0 < unpaired.hi and c.a.lo < c.b.hi


def test_direction_of_worse() -> None:
    idx = resamples(32, 500, seed=0)
    base = np.linspace(0.5, 0.9, 32)
    # higher is better (retrieval, accuracy): lower values are worse, compared by difference
    worse = paired_comparison(_mean(base - 0.1, higher_is_better=True),
                              _mean(base, higher_is_better=True), idx)["m"]
    assert worse.contrast is Contrast.DIFFERENCE and worse.delta.value == pytest.approx(-0.1)
    assert worse.worse and not worse.better and worse.point_worse and worse.neutral == 0.0
    better = paired_comparison(_mean(base + 0.05, higher_is_better=True),
                               _mean(base, higher_is_better=True), idx)["m"]
    assert better.better and not better.worse
    # lower is better (KL, perplexity): a higher ratio is worse
    assert paired_comparison(_mean(base * 1.2), _mean(base), idx)["m"].worse
    assert paired_comparison(_mean(base * 0.8), _mean(base), idx)["m"].better
    # equal everywhere: within the interval, neither way
    same = paired_comparison(_mean(base), _mean(base), idx)["m"]
    assert not same.worse and not same.better and same.delta.to_dict() == {"value": 1.0, "lo": 1.0, "hi": 1.0}


def test_a_zero_baseline_is_compared_by_difference_and_skipped_metrics_stay_out() -> None:
    idx = resamples(4, 100, seed=0)
    c = paired_comparison(_mean(np.array([0.1, 0.2, 0.1, 0.3])), _mean(np.zeros(4)), idx)["m"]
    assert c.contrast is Contrast.DIFFERENCE and c.delta.value == pytest.approx(0.175) and c.worse
    s = SampleStats(columns={"v": np.ones(4), "one": np.ones(4)},
                    metrics={"m": RatioMetric(numerator="v", denominator="one"),
                             "fp": RatioMetric(numerator="v", denominator="one", compare=False)})
    assert set(paired_comparison(s, s, idx)) == {"m"}
    with pytest.raises(InvalidParameterError, match="same samples"):
        paired_comparison(s, _mean(np.ones(3)), idx)
