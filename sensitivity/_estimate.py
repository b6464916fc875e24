"""The one estimate entry point: :func:`estimate` (model, :class:`~sensitivity.EstimateSpec`) →
CostTable, dispatched on ``spec.execution``: the whole model in memory (:mod:`sensitivity._driver`),
one block at a time (:mod:`sensitivity._sequential`) or shards claimed by worker processes
(:mod:`sensitivity._sharded`). Every execution seeds the same way and records the same
:data:`~sensitivity._driver.PROVENANCE_KEYS`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.table import CostTable
from sensitivity._driver import load_data, prepare, provenance, run_prepared, seeded, spec_units
from sensitivity._sequential import SEQUENTIAL, estimate_sequential
from sensitivity._sharded import ShardJob, ShardsPending, run_shards
from sensitivity._spec import EstimateSpec, Execution

if TYPE_CHECKING:
    from allocator.model.loading import LoadedModel
    from allocator.model.quant import Quantizer

__all__ = ["estimate"]


def estimate(model: str | Path | LoadedModel | None, spec: EstimateSpec, *,
             prebuilt_quantizer: Quantizer | None = None) -> CostTable:
    """Estimate a cost table for ``model`` as ``spec`` says.

    Args:
        model: a local Hugging Face model directory, ``"minilm"`` / ``"tiny-llama"`` /
            ``"vit-digits"`` (bundled), a loaded :class:`~allocator.model.loading.LoadedModel`
            (whole-model execution only), or None (MiniLM).
        spec: what to estimate and how it executes (:class:`~sensitivity.EstimateSpec`).
        prebuilt_quantizer: a built :class:`~allocator.model.quant.Quantizer` of the kind
            ``spec.quantizer`` names, to form ΔW with (``run`` shares its cache with
            refinement); None builds one.

    Raises:
        UnknownNameError, InvalidParameterError, ModelError: with one-line messages.
        ShardsPending: a sharded spec whose shards are not all complete yet (nothing failed).
    """
    if not isinstance(spec, EstimateSpec):
        raise InvalidParameterError(f"spec must be a sensitivity.EstimateSpec, got {spec!r}")
    if prebuilt_quantizer is not None and spec.execution is not Execution.WHOLE:
        raise InvalidParameterError("a ready quantizer is only taken by a whole-model estimate; "
                                    "drop it or the sequential / sharded execution")
    if spec.execution is Execution.SEQUENTIAL:
        return _estimate_sequential(model, spec)
    if spec.execution is Execution.SHARDED:
        outcome = run_shards(ShardJob(model=_path(model, "a sharded estimate"), spec=spec))
        if outcome.table is None:
            raise ShardsPending(outcome)
        return outcome.table
    return run_prepared(prepare(model, spec, quantizer=prebuilt_quantizer))


def _path(model: Any, what: str) -> str:
    from allocator.model.loading import LoadedModel

    if isinstance(model, LoadedModel):
        raise InvalidParameterError(f"{what} reads the model from its directory: pass its path or "
                                    f"name ({model.path!r}), not a loaded model")
    return "minilm" if model is None else str(model)


def _estimate_sequential(model: Any, spec: EstimateSpec) -> CostTable:
    """The table with one block in memory (:func:`sensitivity._sequential.estimate_sequential`),
    on the same calibration batches, seed and provenance keys as the whole-model run."""
    from allocator.model.sequential import SequentialModel

    if spec.method not in SEQUENTIAL:
        raise InvalidParameterError(f"--method {spec.method} has no sequential mode; use one of "
                                    f"{', '.join(SEQUENTIAL)}, or drop --sequential")
    seq = SequentialModel(_path(model, "a sequential estimate"), device=spec.device)
    units = spec_units(seq.model, spec)
    calib = load_data(spec.data, seq.tokenizer, kind=str(seq.kind), samples=spec.samples,
                      seq_len=spec.seq_len, batch_size=spec.batch_size, seed=spec.seed)
    meta = provenance(spec, name=seq.name, path=str(seq.path), kind=str(seq.kind),
                       fingerprint=seq.fingerprint(), n_units=len(units), calibration=calib)
    start = time.perf_counter()
    with seeded(spec.seed):
        table = estimate_sequential(seq, spec.estimator(), batches=list(calib.to(spec.device)),
                                    options=spec.formats(), units=units, seed=spec.seed,
                                    device=spec.device, metadata=meta)
    return CostTable(table.df, {**table.metadata, "seconds": round(time.perf_counter() - start, 3)})
