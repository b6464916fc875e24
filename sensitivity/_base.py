"""The estimator contract: (model, batches, units, options, seed) → CostTable.

Every estimator subclasses :class:`BaseEstimator` and implements :meth:`BaseEstimator._costs`,
returning an (n_units × n_options) cost matrix (and optionally its standard deviation). The
base class builds the table with the same columns whatever the method, and records the
metadata (method, parameters, model and data fingerprints, seed).

Mergeable statistics. A *batch-additive* estimator (:class:`BatchAdditiveEstimator`) computes its
costs from statistics that are sums over calibration batches: ``_partial(model, ctx)`` returns a
:class:`Partial` (sums and counts over ``ctx.batches`` only) and ``_finish(model, ctx, partial)``
turns the merged statistics into costs,

    costs(B₁ ∪ … ∪ B_k) = finish(partial(B₁) + … + partial(B_k)),

so the sharded runner (:mod:`sensitivity._sharded`) can split the batches over workers and
merge. Random draws come from :meth:`EstimateContext.batch_generator`, seeded by (seed, the
batch's index in the whole calibration set), so a batch draws the same probes in whichever shard
it lands and the merged table equals the single-process one up to float round-off.
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from allocator.core.errors import EstimatorUnavailableError, InvalidParameterError
from allocator.core.formats import QuantFormat
from allocator.core.table import CostTable
from allocator.core.units import Unit, unit_weight
from allocator.model.quant import Quantizer, RtnQuantizer

if TYPE_CHECKING:
    import torch

__all__ = [
    "BaseEstimator",
    "BatchAdditiveEstimator",
    "EstimateContext",
    "Partial",
    "SampleMeanEstimator",
    "UnitCosts",
    "quant_errors",
    "score_times_error",
]


@dataclass(frozen=True, kw_only=True)
class EstimateContext:
    """Everything an estimator sees besides the model.

    Attributes:
        batches: calibration batches (dicts of tensors for ``model(**batch)``); may be empty
            for data-free methods.
        units, options: what to score.
        seed: seeds torch/numpy for reproducible probes.
        device: "cpu" or "cuda".
        model_kind: "causal_lm", "encoder", "classifier" or "generic" (chooses the loss).
        progress: show progress bars.
        batch_ids: index of each of ``batches`` in the whole calibration set (None: 0, 1, …);
            a shard of the batches keeps their ids, so their seeds do not move
            (:meth:`batch_seed`).
        quantizer: forms ``Q_o(W)`` for every ΔW the estimator measures (RTN by default; the
            plan's own quantizer, e.g. GPTQ, with ``--quantizer``; docs/quantizer.md).
    """

    batches: Sequence[Mapping[str, Any]]
    units: Sequence[Unit]
    options: Sequence[QuantFormat]
    seed: int = 0
    device: str = "cpu"
    model_kind: str = "generic"
    progress: bool = True
    batch_ids: tuple[int, ...] | None = None
    quantizer: Quantizer = field(default_factory=RtnQuantizer)

    def __post_init__(self) -> None:
        ids = self.batch_ids
        if ids is not None and (len(ids) != len(self.batches) or len(set(ids)) != len(ids)
                                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                       for i in ids)):
            raise InvalidParameterError(f"batch_ids must be {len(self.batches)} distinct ints ≥ 0 "
                                        f"(one per batch), got {ids!r}")

    def batch_id(self, i: int) -> int:
        """Index of ``batches[i]`` in the whole calibration set."""
        return i if self.batch_ids is None else self.batch_ids[i]

    def batch_seed(self, i: int) -> int:
        """Seed of ``batches[i]``: a hash of (``seed``, :meth:`batch_id`) (numpy SeedSequence),
        so the draws of a batch do not depend on which other batches are in the context."""
        state = np.random.SeedSequence([self.seed, self.batch_id(i)]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))  # 63 bits: torch.Generator.manual_seed takes it

    def batch_generator(self, i: int) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with :meth:`batch_seed` (CPU: the same draws on every
        device)."""
        import torch

        return torch.Generator().manual_seed(self.batch_seed(i))

    def subset(self, indices: Sequence[int]) -> EstimateContext:
        """The context of ``batches[i] for i in indices`` (ids kept, everything else equal)."""
        import dataclasses

        return dataclasses.replace(self, batches=[self.batches[i] for i in indices],
                                   batch_ids=tuple(self.batch_id(i) for i in indices))


@dataclass(frozen=True, kw_only=True)
class UnitCosts:
    """What :meth:`BaseEstimator._costs` returns."""

    cost: np.ndarray  #: (n_units, n_options), ≥ 0
    cost_std: np.ndarray | None = None  #: same shape, or None
    info: Mapping[str, Any] = field(default_factory=dict)  #: extra metadata (scores, iterations)


@dataclass(frozen=True, kw_only=True)
class Partial:
    """Additive statistics of some calibration batches (:class:`BatchAdditiveEstimator`).

    Every array in ``sums`` and every integer in ``counts`` is a sum over batches, so the
    statistics of a union of disjoint batch sets is the element-wise sum (:meth:`merge`).
    ``info`` holds values that do not depend on the batches (metric, probes per sample); shards
    must agree on them. ``batches`` lists the batch ids covered.
    """

    sums: Mapping[str, np.ndarray]
    counts: Mapping[str, int] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    batches: tuple[int, ...] = ()

    @staticmethod
    def merge(parts: Sequence[Partial]) -> Partial:
        """Σ of the parts (in the given order); the parts must cover disjoint batches, hold the
        same sums and counts, and agree on ``info``."""
        if not parts:
            raise InvalidParameterError("merging partial statistics needs at least one part")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        seen: set[int] = set()
        for p in parts:
            if set(p.sums) != set(first.sums) or set(p.counts) != set(first.counts):
                raise InvalidParameterError("partial statistics hold different sums; were they "
                                            "computed by the same estimator?")
            if dict(p.info) != dict(first.info):
                diff = sorted(k for k in set(p.info) | set(first.info)
                              if p.info.get(k) != first.info.get(k))
                raise InvalidParameterError(f"partial statistics disagree on {diff}; were they "
                                            "computed with the same parameters?")
            if seen & set(p.batches):
                raise InvalidParameterError(f"batches {sorted(seen & set(p.batches))} are in two "
                                            "partial statistics; each batch must be counted once")
            seen |= set(p.batches)
        sums = {k: np.sum([np.asarray(p.sums[k], dtype=np.float64) for p in parts], axis=0)
                for k in first.sums}
        counts = {k: sum(int(p.counts[k]) for p in parts) for k in first.counts}
        return Partial(sums=sums, counts=counts, info=dict(first.info),
                       batches=tuple(b for p in parts for b in p.batches))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: arrays as little-endian float64 bytes in base64 (exact, and ~2.5× smaller
        than decimal text)."""
        import base64

        def enc(a: np.ndarray) -> dict[str, Any]:
            a64 = np.ascontiguousarray(a, dtype="<f8")
            return {"shape": list(a64.shape), "f8": base64.b64encode(a64.tobytes()).decode()}

        return {"sums": {k: enc(np.asarray(v)) for k, v in self.sums.items()},
                "counts": {k: int(v) for k, v in self.counts.items()}, "info": dict(self.info),
                "batches": list(self.batches)}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> Partial:
        """Inverse of :meth:`to_json`."""
        import base64

        try:
            sums = {k: np.frombuffer(base64.b64decode(v["f8"]), dtype="<f8").reshape(v["shape"])
                    .astype(np.float64) for k, v in obj["sums"].items()}
            return Partial(sums=sums, counts={k: int(v) for k, v in obj["counts"].items()},
                           info=dict(obj["info"]), batches=tuple(int(b) for b in obj["batches"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidParameterError(f"malformed partial statistics ({type(exc).__name__}: "
                                        f"{exc}); delete the study and estimate again") from None


class BaseEstimator(abc.ABC):
    """Estimates ``cost(unit, option)``: the predicted loss increase if the unit uses the option.

    Configuration goes to the constructor as keyword-only arguments and is stored unchanged
    (it is recorded in the table metadata by :meth:`params`).
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = True
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("torch",)

    @classmethod
    def is_available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in cls.REQUIRED_MODULES)

    def params(self) -> dict[str, Any]:
        return {k.lstrip("_"): v for k, v in vars(self).items() if not k.startswith("__")}

    def batch_additive(self) -> bool:
        """Whether the costs come from statistics that add over calibration batches (then the
        sharded runner splits the batches; see :class:`BatchAdditiveEstimator`)."""
        return False

    def _check(self, ctx: EstimateContext) -> None:
        if not self.is_available():
            missing = [m for m in self.REQUIRED_MODULES if importlib.util.find_spec(m) is None]
            raise EstimatorUnavailableError(f"estimator {self.name!r} needs {', '.join(missing)}")
        if self.needs_data and not ctx.batches:
            raise InvalidParameterError(
                f"estimator {self.name!r} needs calibration data; pass --data or use the built-in corpus"
            )
        if not ctx.units:
            raise InvalidParameterError("no units to estimate; check the include/exclude filters")

    def estimate(
        self, model: torch.nn.Module, ctx: EstimateContext, *, metadata: Mapping[str, Any] | None = None
    ) -> CostTable:
        """Score every unit × option and return a validated :class:`CostTable`."""
        self._check(ctx)
        return self.table(ctx, self._costs(model, ctx), metadata=metadata)

    def table(self, ctx: EstimateContext, out: UnitCosts, *,
              metadata: Mapping[str, Any] | None = None) -> CostTable:
        """The validated :class:`CostTable` of ``out`` (the costs of ``ctx.units`` ×
        ``ctx.options``), with this estimator's metadata."""
        cost = np.asarray(out.cost, dtype=np.float64)
        expected = (len(ctx.units), len(ctx.options))
        if cost.shape != expected:
            raise RuntimeError(
                f"estimator {self.name!r} returned costs of shape {cost.shape}, not {expected}")
        # Round-off can make a near-zero measured cost slightly negative; the contract says ≥ 0.
        cost = np.maximum(cost, 0.0)
        meta = {"estimator": self.name, "estimator_params": self.params(), "seed": ctx.seed,
                "device": ctx.device, **dict(out.info), **dict(metadata or {})}
        return CostTable.from_unit_costs(
            units=[u.name for u in ctx.units], params=[u.params for u in ctx.units],
            options=list(ctx.options), cost=cost, cost_std=out.cost_std,
            in_features=[u.in_features for u in ctx.units], tie=[u.tie for u in ctx.units],
            metadata=meta,
        )

    @abc.abstractmethod
    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        """The (n_units × n_options) cost matrix for ``ctx.units`` × ``ctx.options``."""


class BatchAdditiveEstimator(BaseEstimator):
    """An estimator whose costs are a function of sums over calibration batches (module doc):

        costs = _finish(Σ_shards _partial(shard)),

    and whose ``_costs`` is ``_finish(_partial(all batches))`` unless a subclass computes the same
    thing directly. Which estimators qualify and why is listed in ``docs/sensitivity-measured.md``
    ("Sharding the data-based estimators").
    """

    def batch_additive(self) -> bool:
        return True

    def partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        """The statistics of ``ctx.batches`` (one shard), tagged with their batch ids."""
        import dataclasses

        if not self.batch_additive():
            raise InvalidParameterError(f"estimator {self.name!r} with {self.params()} is not "
                                        "batch-additive; it cannot be sharded by batch")
        self._check(ctx)
        out = self._partial(model, ctx)
        return dataclasses.replace(out, batches=tuple(ctx.batch_id(i)
                                                      for i in range(len(ctx.batches))))

    def finish(self, model: torch.nn.Module, ctx: EstimateContext, partials: Sequence[Partial], *,
               metadata: Mapping[str, Any] | None = None) -> CostTable:
        """The table of the merged ``partials``, which must cover every batch of ``ctx``."""
        self._check(ctx)
        merged = Partial.merge(partials)
        want = {ctx.batch_id(i) for i in range(len(ctx.batches))}
        if set(merged.batches) != want:
            raise InvalidParameterError(
                f"the partial statistics cover batches {sorted(merged.batches)}, not the "
                f"context's {sorted(want)}; every batch must be counted exactly once")
        return self.table(ctx, self._finish(model, ctx, merged), metadata=metadata)

    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        return self._finish(model, ctx, self._partial(model, ctx))

    @abc.abstractmethod
    def _partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        """Sums and counts over ``ctx.batches`` only (random draws from
        :meth:`EstimateContext.batch_generator`)."""

    @abc.abstractmethod
    def _finish(self, model: torch.nn.Module, ctx: EstimateContext, partial: Partial) -> UnitCosts:
        """The costs of ``ctx.units`` × ``ctx.options`` from the statistics of every batch."""


class SampleMeanEstimator(BatchAdditiveEstimator):
    """A batch-additive estimator whose ``_costs`` is a mean over calibration samples s (the
    sampled Gauss–Newton family, :func:`sensitivity._curvature.sampling.sampled_curvature`):

        cost = S₁/P,  cost_std = (N/P)·√(v/N),  v = (S₂/N − (S₁/N)²)·N/(N − 1)  (0 if N = 1),

    with S₁ = Σ_s t_s, S₂ = Σ_s t_s², N samples and P counted positions (``info["samples"]``,
    ``info["positions"]``). (cost, cost_std, N, P) determine the sums exactly (up to round-off):

        S₁ = P·cost,   S₂ = (N − 1)·v + S₁²/N,   v = N·(cost_std·P/N)²,

    so ``_partial`` runs the estimator's own ``_costs`` on the given batches and returns
    (S₁, S₂, N, P); ``_finish`` applies the first line to the merged sums. The sampling engine
    thus stays one function, and a single-process run is unchanged. ``info_pairs`` names
    further (mean, sem) lists in ``info`` over the same samples (hessian-trace: trace,
    trace_sem); every other ``info`` entry must not depend on the batches.
    """

    info_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()

    @abc.abstractmethod
    def _costs(self, model: torch.nn.Module, ctx: EstimateContext) -> UnitCosts:
        """The sample-mean costs of ``ctx.batches`` (with ``samples`` and ``positions`` in info)."""

    def _partial(self, model: torch.nn.Module, ctx: EstimateContext) -> Partial:
        out = self._costs(model, ctx)
        n, pos = int(out.info["samples"]), int(out.info["positions"])
        if out.cost_std is None:
            raise RuntimeError(f"estimator {self.name!r} returned no cost_std to merge")
        pairs = {"cost": (out.cost, out.cost_std),
                 **{m: (out.info[m], out.info[s]) for m, s in self.info_pairs}}
        sums: dict[str, np.ndarray] = {}
        for key, (mean, sem) in pairs.items():
            s1, s2 = mean_sums(np.asarray(mean, dtype=np.float64),
                                np.asarray(sem, dtype=np.float64), n, pos)
            sums[f"{key}:s1"], sums[f"{key}:s2"] = s1, s2
        per_batch = {"samples", "positions", *(k for pair in self.info_pairs for k in pair)}
        return Partial(sums=sums, counts={"samples": n, "positions": pos},
                       info={k: v for k, v in out.info.items() if k not in per_batch})

    def _finish(self, model: torch.nn.Module, ctx: EstimateContext, partial: Partial) -> UnitCosts:
        n, pos = int(partial.counts["samples"]), int(partial.counts["positions"])
        if n == 0 or pos == 0:
            raise InvalidParameterError("no calibration sample has an output position to compare; "
                                        "pass non-empty texts")
        cost, std = mean_and_sem(partial.sums["cost:s1"], partial.sums["cost:s2"], n, pos)
        info: dict[str, Any] = {}
        for m, s in self.info_pairs:
            mean, sem = mean_and_sem(partial.sums[f"{m}:s1"], partial.sums[f"{m}:s2"], n, pos)
            info[m], info[s] = mean.tolist(), sem.tolist()
        # The key order of a single-process table: the estimator's own, then the counts.
        return UnitCosts(cost=cost, cost_std=std,
                         info={**info, **partial.info, "samples": n, "positions": pos})


def mean_sums(mean: np.ndarray, sem: np.ndarray, n: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(S₁, S₂) of a sample mean (:class:`SampleMeanEstimator`)."""
    s1 = mean * pos
    var = n * (sem * pos / n) ** 2
    return s1, (n - 1) * var + s1**2 / n


def mean_and_sem(s1: np.ndarray, s2: np.ndarray, n: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sem) of the sums (:class:`SampleMeanEstimator`)."""
    m = s1 / n
    var = (s2 / n - m**2) * n / max(n - 1, 1)
    sem = (n / pos) * np.sqrt(np.maximum(var, 0.0) / n) if n > 1 else np.zeros_like(s1)
    return s1 / pos, sem


def quant_errors(model: torch.nn.Module, units: Sequence[Unit], options: Iterable[QuantFormat],
                 quantizer: Quantizer | None = None) -> np.ndarray:
    """‖Q_b(W_i) − W_i‖²_F for every unit i and option b, with ``quantizer`` (default RTN)."""
    import torch

    q = quantizer or RtnQuantizer()
    opts = list(options)
    out = np.empty((len(units), len(opts)))
    with torch.no_grad():
        for i, unit in enumerate(units):
            w = unit_weight(model, unit).detach().float()
            for j, fmt in enumerate(opts):
                out[i, j] = float(((q.quantize(unit, w, fmt) - w) ** 2).sum())
    return out


def score_times_error(score: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """cost(i, b) = score_i · ‖Q_b(W_i) − W_i‖² (how one-score-per-unit methods become costs).

    HAWQ-V2: score_i = Tr(H_i)/n_i, so cost = Ω_i(b) = Tr(H_i)/n_i · ‖ΔW_i‖².
    """
    return np.asarray(score, dtype=np.float64)[:, None] * errors
