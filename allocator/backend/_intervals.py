"""Bootstrap intervals of evaluation metrics over evaluation samples.

Every metric :func:`~allocator.backend.evaluate` reports is a function of a *ratio of sums* over
the evaluation samples (texts, packed windows, images):

    m = f(Σ_i a_i / Σ_i b_i)        f ∈ {identity, exp, 1 − ·}

(KL = Σ KL_i / Σ tokens_i, perplexity = exp(Σ NLL_i / Σ targets_i), 1 − cos = Σ d_i / n,
retrieval@k = Σ hit_i / Σ query_i, accuracy = Σ correct_i / n). :class:`SampleStats` keeps the
per-sample a_i and b_i (a few floats per sample, never outputs), so a metric can be recomputed
on any resample of the samples.

* :func:`resamples` — ``draws`` bootstrap resamples of n samples, drawn with replacement from a
  seeded generator (the same seed gives the same intervals).
* :func:`percentile_interval` — the percentile interval [q_{α/2}, q_{1−α/2}] of the replicates.
* :func:`metric_intervals` — each metric of one evaluation with its interval.
* :func:`paired_comparison` — plan A against plan B evaluated on the *same* samples: both are
  recomputed on each resample, and the interval is the one of their ratio m_A / m_B (metrics
  where lower is better) or difference m_A − m_B (higher is better). The texts' own difficulty
  moves both plans alike, so the paired interval is narrower than the two separate ones.

Retrieval counts each query's top-k overlap as that query's value: resampling does not redraw
the neighbour pool the overlap was measured in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from allocator.core.errors import InvalidParameterError

__all__ = [
    "DEFAULT_DRAWS",
    "DEFAULT_LEVEL",
    "Comparison",
    "Contrast",
    "Interval",
    "RatioMetric",
    "SampleStats",
    "Transform",
    "metric_intervals",
    "paired_comparison",
    "percentile_interval",
    "resamples",
]

#: bootstrap resamples and coverage of the intervals bitalloc reports
DEFAULT_DRAWS = 1000
DEFAULT_LEVEL = 0.95


class Transform(StrEnum):
    """f in m = f(Σ a / Σ b)."""

    IDENTITY = "identity"
    EXP = "exp"
    #: 1 − x (cosine similarity from the mean cosine distance)
    COMPLEMENT = "complement"


class Contrast(StrEnum):
    """How two plans' values of a metric are compared."""

    RATIO = "ratio"            # m_A / m_B: neutral 1
    DIFFERENCE = "difference"  # m_A − m_B: neutral 0


@dataclass(frozen=True, kw_only=True)
class RatioMetric:
    """m = transform(Σ_i numerator_i / Σ_i denominator_i) over the samples i."""

    numerator: str
    denominator: str
    transform: Transform = Transform.IDENTITY
    higher_is_better: bool = False
    #: False for a metric two plans cannot differ in (the full-precision perplexity) or one that
    #: restates another (cosine = 1 − cos_distance): :func:`paired_comparison` skips it
    compare: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "transform", Transform(self.transform))


@dataclass(frozen=True, kw_only=True, eq=False)
class SampleStats:
    """Per-sample sufficient statistics of an evaluation: named float64 columns of one length
    (one value per sample) and the metrics they define."""

    columns: Mapping[str, np.ndarray]
    metrics: Mapping[str, RatioMetric]

    def __post_init__(self) -> None:
        cols = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.columns.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise InvalidParameterError(f"sample columns differ in length: "
                                        f"{ {k: len(v) for k, v in cols.items()} }")
        for name, m in self.metrics.items():
            missing = {m.numerator, m.denominator} - cols.keys()
            if missing:
                raise InvalidParameterError(f"metric {name!r} needs the columns {sorted(missing)}")
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "metrics", dict(self.metrics))

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def value(self, name: str, idx: np.ndarray | None = None) -> float | np.ndarray:
        """Metric ``name`` on all samples (a float; 0 where its denominator sums to 0), or on each
        row of resample indices ``idx`` [draws, n] (an array; NaN where a resample's denominator
        is 0)."""
        if name not in self.metrics:
            raise InvalidParameterError(f"no metric {name!r}; have {sorted(self.metrics)}")
        m = self.metrics[name]
        num, den = self.columns[m.numerator], self.columns[m.denominator]
        if idx is None:
            s, c = float(num.sum()), float(den.sum())
            return _transform(m.transform, s / c if c != 0 else 0.0)
        s_r, c_r = num[idx].sum(-1), den[idx].sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.where(c_r != 0, s_r / np.where(c_r != 0, c_r, 1.0), np.nan)
        return _transform(m.transform, x)

    def values(self) -> dict[str, float]:
        """Every metric on all samples."""
        return {k: float(self.value(k)) for k in self.metrics}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleStats):
            return NotImplemented
        return (self.metrics == other.metrics and self.columns.keys() == other.columns.keys()
                and all(np.array_equal(v, other.columns[k]) for k, v in self.columns.items()))

    __hash__ = None  # type: ignore[assignment]


def _transform(t: Transform, x: float | np.ndarray) -> float | np.ndarray:
    if t is Transform.EXP:
        return math.exp(x) if isinstance(x, float) else np.exp(x)
    if t is Transform.COMPLEMENT:
        return 1.0 - x
    return x


@dataclass(frozen=True, kw_only=True)
class Interval:
    """A point estimate and its bootstrap interval [lo, hi] at ``level``."""

    value: float
    lo: float
    hi: float
    level: float = DEFAULT_LEVEL

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}

    def text(self, fmt: str = ".4g") -> str:
        """``value [lo, hi]``."""
        return f"{self.value:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Metric ``metric`` of plan A against plan B on the same samples (:func:`paired_comparison`)."""

    metric: str
    a: Interval
    b: Interval
    contrast: Contrast
    #: A / B or A − B with its paired interval
    delta: Interval
    higher_is_better: bool

    @property
    def neutral(self) -> float:
        """The ratio / difference of two equal values: 1 or 0."""
        return 1.0 if self.contrast is Contrast.RATIO else 0.0

    @property
    def worse(self) -> bool:
        """A is worse than B beyond the interval: the whole interval of the ratio / difference
        lies on B's better side of :attr:`neutral`."""
        d = self.delta
        return d.hi < self.neutral if self.higher_is_better else d.lo > self.neutral

    @property
    def better(self) -> bool:
        """A is better than B beyond the interval."""
        d = self.delta
        return d.lo > self.neutral if self.higher_is_better else d.hi < self.neutral

    @property
    def point_worse(self) -> bool:
        """A's point estimate is worse than B's (whatever the interval)."""
        v = self.delta.value
        return v < self.neutral if self.higher_is_better else v > self.neutral

    @property
    def verdict(self) -> str:
        return "worse" if self.worse else "better" if self.better else "within the interval"

    def to_dict(self) -> dict[str, object]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "contrast": str(self.contrast),
                "delta": self.delta.to_dict(), "higher_is_better": self.higher_is_better,
                "verdict": self.verdict}


def resamples(n: int, draws: int = DEFAULT_DRAWS, seed: int = 0) -> np.ndarray:
    """Bootstrap indices [draws, n]: ``n`` samples drawn with replacement, ``draws`` times, from
    ``numpy.random.default_rng(seed)``."""
    if n < 1 or draws < 1:
        raise InvalidParameterError(f"a bootstrap needs n ≥ 1 samples and draws ≥ 1, got {n}, {draws}")
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def percentile_interval(point: float, replicates: np.ndarray,
                        level: float = DEFAULT_LEVEL) -> Interval:
    """[q_{(1−level)/2}, q_{(1+level)/2}] of the replicates (NaN ones ignored) around ``point``."""
    if not 0 < level < 1:
        raise InvalidParameterError(f"level must be in (0, 1), got {level!r}")
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return Interval(value=float(point), lo=math.nan, hi=math.nan, level=level)
    lo, hi = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return Interval(value=float(point), lo=float(lo), hi=float(hi), level=level)


def metric_intervals(stats: SampleStats, idx: np.ndarray,
                     level: float = DEFAULT_LEVEL) -> dict[str, Interval]:
    """Each metric of ``stats`` with its percentile interval over the resamples ``idx``."""
    return {k: percentile_interval(float(stats.value(k)), np.asarray(stats.value(k, idx)), level)
            for k in stats.metrics}


def paired_comparison(a: SampleStats, b: SampleStats, idx: np.ndarray,
                      level: float = DEFAULT_LEVEL) -> dict[str, Comparison]:
    """Plan A against plan B, both evaluated on the same samples, per metric both have (those
    with ``compare``): the paired interval of m_A / m_B where lower is better and m_B is positive
    on every resample, else of m_A − m_B; both plans recomputed on each row of ``idx``."""
    if a.n != b.n:
        raise InvalidParameterError(f"a paired comparison needs the same samples; got {a.n} and {b.n}")
    out: dict[str, Comparison] = {}
    for name, m in a.metrics.items():
        if not m.compare or name not in b.metrics:
            continue
        ra, rb = np.asarray(a.value(name, idx)), np.asarray(b.value(name, idx))
        va, vb = float(a.value(name)), float(b.value(name))
        ratio = not m.higher_is_better and vb > 0 and bool(np.all(rb[~np.isnan(rb)] > 0))
        if ratio:
            delta = percentile_interval(va / vb, ra / rb, level)
        else:
            delta = percentile_interval(va - vb, ra - rb, level)
        out[name] = Comparison(metric=name, a=percentile_interval(va, ra, level),
                               b=percentile_interval(vb, rb, level),
                               contrast=Contrast.RATIO if ratio else Contrast.DIFFERENCE,
                               delta=delta, higher_is_better=m.higher_is_better)
    return out

