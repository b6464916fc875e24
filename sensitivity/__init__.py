"""Sensitivity estimators: (model, calibration data, candidate options) → CostTable.

Estimators are registered by name; :func:`estimate` is the one driver. ``sensitivity`` depends
on ``allocator`` core types only and never imports ``solvers``.
"""

from __future__ import annotations

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
from sensitivity._measured import default_metric
from sensitivity._registry import ESTIMATORS, estimator_class, get_estimator
from sensitivity._sequential import LAYER_LOCAL, SEQUENTIAL, estimate_sequential
from sensitivity._sharded import (
    ShardedEstimateSpec,
    ShardOutcome,
    estimate_fingerprint,
    run_shard_worker,
    run_sharded,
)
from sensitivity._spec import EstimateSpec, check_estimator_params, estimator_parameters

__all__ = [
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
]

#: High-level driver (model + data + method → CostTable); see :func:`sensitivity._driver.run_estimate`.
estimate = run_estimate
