"""Sensitivity estimators: (model, calibration data, candidate options) → CostTable.

Estimators are registered by name; :func:`estimate` (model, :class:`EstimateSpec`) → CostTable is
the one entry point, whole-model, block by block (``sequential``) or sharded (``sharding``).
``sensitivity`` depends on ``allocator`` core types only and never imports ``solvers``.
"""

from __future__ import annotations

import importlib
from typing import Any

from allocator.core.errors import UnknownNameError
from allocator.model.distortion import Metric, distortion, per_sample_sums
from sensitivity._activation_cache import BlockCache, make_chunks
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors, score_times_error
from sensitivity._driver import PROVENANCE_KEYS, estimate, seeded
from sensitivity._hessian import first_order_graph, hutchinson_traces, hvp, rademacher_probes, unit_quadratics
from sensitivity._loss import gradient_mode, unit_leaves
from sensitivity._measured import default_metric, measure_units, merge_measured, shard_units
from sensitivity._sequential import LAYER_LOCAL, SEQUENTIAL
from sensitivity._sharded import ShardOutcome, ShardsPending
from sensitivity._spec import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    EstimateSpec,
    Execution,
    Sharding,
    check_estimator_params,
    estimator_parameters,
    sharded_methods,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    # the one entry point: estimate(model, EstimateSpec(...)) → CostTable
    "estimate",
    "EstimateSpec",
    "Execution",
    "Sharding",
    "ShardOutcome",
    "ShardsPending",
    "PROVENANCE_KEYS",
    "SEQUENTIAL",
    "LAYER_LOCAL",
    "sharded_methods",
    # estimators and the pieces to write one
    "ESTIMATORS",
    "BaseEstimator",
    "BlockCache",
    "EstimateContext",
    "Metric",
    "UnitCosts",
    "check_estimator_params",
    "default_metric",
    "distortion",
    "estimator_class",
    "estimator_parameters",
    "get_estimator",
    "make_chunks",
    "per_sample_sums",
    "quant_errors",
    "score_times_error",
    "seeded",
    # the parts under the estimators, for experiments and benchmarks: the shardable measuring
    # loop of ``measured`` and the Hutchinson machinery (HVPs on the task loss) of the curvature ones
    "measure_units",
    "merge_measured",
    "shard_units",
    "first_order_graph",
    "gradient_mode",
    "hutchinson_traces",
    "hvp",
    "rademacher_probes",
    "unit_leaves",
    "unit_quadratics",
]

#: name → "module:Class" (documented in each class's docstring with its paper).
ESTIMATORS: dict[str, str] = {
    "hessian-trace": "sensitivity._hessian_trace:HessianTraceEstimator",
    "hessian-eig": "sensitivity._hessian_eig:HessianEigEstimator",
    "fisher": "sensitivity._fisher:FisherEstimator",
    "gauss-newton": "sensitivity._gauss_newton:GaussNewtonEstimator",
    "salience": "sensitivity._salience:SalienceEstimator",
    "hessian-proxy": "sensitivity._salience:HessianProxyEstimator",
    "relevance": "sensitivity._relevance:RelevanceEstimator",
    "measured": "sensitivity._measured:MeasuredEstimator",
    "datafree": "sensitivity._datafree:DataFreeEstimator",
    "lim": "sensitivity._datafree:LimEstimator",
    "zd": "sensitivity._datafree:ZdEstimator",
}


def estimator_class(name: str) -> type[BaseEstimator]:
    if name not in ESTIMATORS:
        raise UnknownNameError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    module, cls = ESTIMATORS[name].split(":")
    found: type[BaseEstimator] = getattr(importlib.import_module(module), cls)
    return found


def get_estimator(name: str | BaseEstimator, **params: Any) -> BaseEstimator:
    """An estimator instance from a name (constructor ``params`` passed on) or an instance."""
    if isinstance(name, BaseEstimator):
        return name
    return estimator_class(name)(**params)

