"""Quantization backend: apply a bit plan to a torch model, verify it, evaluate it.

* :func:`apply_plan` — per-unit fake quantization in place, RTN (the shared quantizer) or GPTQ.
* :func:`verify` — read the weights back and check levels, group size, bits and bpw per unit.
* :func:`check_device` — a ``--device`` name this machine can run, or one clear error.
* :func:`evaluate` — perplexity / KL / embedding cosine / retrieval agreement / accuracy against
  cached full-precision outputs (:func:`reference_outputs`).

Importing this package does not import torch; the functions do.
"""

from __future__ import annotations

from allocator.backend._apply import ApplyMethod, ApplyReport, UnitApplied, apply_plan
from allocator.backend._device import check_device
from allocator.backend._evaluate import (
    EvalReport,
    ReferenceOutputs,
    clear_reference_cache,
    data_fingerprint,
    evaluate,
    next_token_nll,
    reference_outputs,
    retrieval_agreement,
)
from allocator.backend._resolve import ResolvedUnit, module_weight, resolve_plan
from allocator.backend._verify import Mismatch, PlanMismatchError, UnitCheck, VerifyReport, verify

__all__ = [
    "ApplyMethod",
    "ApplyReport",
    "EvalReport",
    "Mismatch",
    "PlanMismatchError",
    "ReferenceOutputs",
    "ResolvedUnit",
    "UnitApplied",
    "UnitCheck",
    "VerifyReport",
    "apply_plan",
    "check_device",
    "clear_reference_cache",
    "data_fingerprint",
    "evaluate",
    "module_weight",
    "next_token_nll",
    "reference_outputs",
    "resolve_plan",
    "retrieval_agreement",
    "verify",
]
