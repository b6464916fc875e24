"""Sensitivity estimators: (model, calibration data, candidate options) → CostTable.

Estimators are registered by name; :func:`estimate` (model, :class:`EstimateSpec`) → CostTable is
the one entry point, whole-model, block by block (``sequential``) or sharded (``sharding``).
``sensitivity`` depends on ``allocator`` core types only and never imports ``solvers``.
"""

from __future__ import annotations

from allocator.model.distortion import Metric, distortion, per_sample_sums
from sensitivity._activation_cache import BlockCache, make_chunks
from sensitivity._base import BaseEstimator, EstimateContext, UnitCosts, quant_errors, score_times_error
from sensitivity._deltas import DEFAULT_DELTA_BUDGET_MB
from sensitivity._driver import PROVENANCE_KEYS, seeded
from sensitivity._estimate import estimate
from sensitivity._hessian import first_order_graph, hutchinson_traces, hvp, rademacher_probes, unit_quadratics
from sensitivity._loss import gradient_mode, unit_leaves
from sensitivity._measured import default_metric, measure_units, merge_measured, shard_units
from sensitivity._registry import ESTIMATORS, estimator_class, get_estimator
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
    parse_estimator_params,
    sharded_methods,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DELTA_BUDGET_MB",
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
    "parse_estimator_params",
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

