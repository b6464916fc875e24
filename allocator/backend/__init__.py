"""Quantization backend: apply a bit plan to a torch model, verify it, evaluate it.

* :func:`apply_plan` — per-unit fake quantization in place, RTN (the shared quantizer) or GPTQ.
* :func:`apply_plan_sequential` — GPTQ one transformer block in memory at a time, from the
  safetensors of a model directory (``docs/sequential.md``).
* :func:`verify` — read the weights back and check levels, group size, bits and bpw per unit.
* :func:`evaluate` — perplexity / KL / embedding cosine / retrieval agreement / accuracy against
  cached full-precision outputs (:func:`reference_outputs`), with per-sample sums for bootstrap
  intervals (:class:`SampleStats`, :func:`metric_intervals`, :func:`paired_comparison`).

Importing this package does not import torch; the functions do.
"""

from __future__ import annotations

from allocator.backend._apply import ApplyMethod, ApplyReport, UnitApplied, apply_plan
from allocator.backend._as_applied import gptq_quantizer_as_applied
from allocator.backend._evaluate import (
    EvalReport,
    ReferenceOutputs,
    clear_reference_cache,
    data_fingerprint,
    evaluate,
    next_token_nll,
    next_token_nll_rows,
    reference_outputs,
    retrieval_agreement,
    retrieval_hits,
)
from allocator.backend._intervals import (
    DEFAULT_DRAWS,
    DEFAULT_LEVEL,
    Comparison,
    Contrast,
    Interval,
    RatioMetric,
    SampleStats,
    Transform,
    metric_intervals,
    paired_comparison,
    percentile_interval,
    resamples,
)
from allocator.backend._resolve import ResolvedUnit, module_weight, resolve_plan
from allocator.backend._sequential import SequentialApplyResult, apply_plan_sequential
from allocator.backend._verify import Mismatch, PlanMismatchError, UnitCheck, VerifyReport, verify

__all__ = [
    "DEFAULT_DRAWS",
    "DEFAULT_LEVEL",
    "ApplyMethod",
    "ApplyReport",
    "Comparison",
    "Contrast",
    "EvalReport",
    "Interval",
    "Mismatch",
    "PlanMismatchError",
    "RatioMetric",
    "ReferenceOutputs",
    "ResolvedUnit",
    "SampleStats",
    "SequentialApplyResult",
    "Transform",
    "UnitApplied",
    "UnitCheck",
    "VerifyReport",
    "apply_plan",
    "apply_plan_sequential",
    "clear_reference_cache",
    "data_fingerprint",
    "evaluate",
    "gptq_quantizer_as_applied",
    "metric_intervals",
    "module_weight",
    "next_token_nll",
    "next_token_nll_rows",
    "paired_comparison",
    "percentile_interval",
    "reference_outputs",
    "resamples",
    "resolve_plan",
    "retrieval_agreement",
    "retrieval_hits",
    "verify",
]
