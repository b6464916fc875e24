"""The estimator contract: (model, batches, units, options, seed) → CostTable.

Every estimator subclasses :class:`BaseEstimator` and implements :meth:`BaseEstimator._costs`,
returning an (n_units × n_options) cost matrix (and optionally its standard deviation). The
base class builds the table with the same columns whatever the method, and records the
metadata (method, parameters, model and data fingerprints, seed).
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
from allocator.core.units import Unit

if TYPE_CHECKING:
    import torch

__all__ = ["BaseEstimator", "EstimateContext", "UnitCosts", "quant_errors", "score_times_error"]


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
    """

    batches: Sequence[Mapping[str, Any]]
    units: Sequence[Unit]
    options: Sequence[QuantFormat]
    seed: int = 0
    device: str = "cpu"
    model_kind: str = "generic"
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class UnitCosts:
    """What :meth:`BaseEstimator._costs` returns."""

    cost: np.ndarray  #: (n_units, n_options), ≥ 0
    cost_std: np.ndarray | None = None  #: same shape, or None
    info: Mapping[str, Any] = field(default_factory=dict)  #: extra metadata (scores, iterations)


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

    def estimate(
        self, model: torch.nn.Module, ctx: EstimateContext, *, metadata: Mapping[str, Any] | None = None
    ) -> CostTable:
        """Score every unit × option and return a validated :class:`CostTable`."""
        if not self.is_available():
            missing = [m for m in self.REQUIRED_MODULES if importlib.util.find_spec(m) is None]
            raise EstimatorUnavailableError(f"estimator {self.name!r} needs {', '.join(missing)}")
        if self.needs_data and not ctx.batches:
            raise InvalidParameterError(
                f"estimator {self.name!r} needs calibration data; pass --data or use the built-in corpus"
            )
        if not ctx.units:
            raise InvalidParameterError("no units to estimate; check the include/exclude filters")
        out = self._costs(model, ctx)
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


def quant_errors(model: torch.nn.Module, units: Sequence[Unit], options: Iterable[QuantFormat]) -> np.ndarray:
    """‖Q_b(W_i) − W_i‖²_F for every unit i and option b, with the shared RTN quantizer."""
    from allocator.core.units import unit_weight
    from allocator.model.quant import quant_error

    opts = list(options)
    out = np.empty((len(units), len(opts)))
    for i, unit in enumerate(units):
        w = unit_weight(model, unit)
        for j, fmt in enumerate(opts):
            out[i, j] = quant_error(w, fmt)
    return out


def score_times_error(score: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """cost(i, b) = score_i · ‖Q_b(W_i) − W_i‖² (how one-score-per-unit methods become costs).

    HAWQ-V2: score_i = Tr(H_i)/n_i, so cost = Ω_i(b) = Tr(H_i)/n_i · ‖ΔW_i‖².
    """
    return np.asarray(score, dtype=np.float64)[:, None] * errors
