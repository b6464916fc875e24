"""Sensitivity estimators: (model, calibration data, candidate options) → CostTable.

Estimators are registered by name; :func:`estimate` is the one driver. ``sensitivity`` depends
on ``allocator`` core types only and never imports ``solvers``.
"""

from __future__ import annotations

import importlib
from typing import Any

from allocator.core.errors import UnknownNameError
from allocator.model.distortion import Metric, distortion, per_sample_sums
from sensitivity._activation_cache import BlockCache, make_chunks
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors, score_times_error
from sensitivity._driver import (
    PreparedEstimate,
    build_estimate,
    estimate_loaded,
    estimate_spec,
    load_data,
    prepare,
    prepare_estimate,
    run_estimate,
    run_prepared,
    seeded,
)
from sensitivity._hessian import first_order_graph, hutchinson_traces, hvp, rademacher_probes, unit_quadratics
from sensitivity._loss import gradient_mode, unit_leaves
from sensitivity._measured import default_metric, measure_units, merge_measured, shard_units
from sensitivity._sequential import LAYER_LOCAL, SEQUENTIAL, estimate_sequential
from sensitivity._sharded import (
    ShardedEstimateSpec,
    ShardOutcome,
    estimate_fingerprint,
    run_shard_worker,
    run_sharded,
)
from sensitivity._spec import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    EstimateSpec,
    check_estimator_params,
    estimator_parameters,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "ESTIMATORS",
    "EstimateSpec",
    "PreparedEstimate",
    "build_estimate",
    "check_estimator_params",
    "estimate_loaded",
    "estimate_spec",
    "estimator_parameters",
    "prepare",
    "prepare_estimate",
    "run_prepared",
    "seeded",
    "BaseEstimator",
    "BlockCache",
    "Metric",
    "default_metric",
    "distortion",
    "make_chunks",
    "per_sample_sums",
    "EstimateContext",
    "UnitCosts",
    "estimate",
    "SEQUENTIAL",
    "estimate_sequential",
    "load_data",
    "LAYER_LOCAL",
    "estimator_class",
    "get_estimator",
    "quant_errors",
    "run_estimate",
    "run_shard_worker",
    "run_sharded",
    "score_times_error",
    "ShardOutcome",
    "ShardedEstimateSpec",
    "estimate_fingerprint",
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


#: High-level driver (model + data + method → CostTable); see :func:`sensitivity._driver.run_estimate`.
estimate = run_estimate
