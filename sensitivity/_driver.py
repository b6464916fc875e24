"""The one estimate driver: (model, :class:`~sensitivity.EstimateSpec`) → validated CostTable.

:func:`estimate` loads the model (:func:`allocator.model.loading.load_model`) and calibration
batches (:class:`allocator.model.data.CalibrationData`: the built-in corpus, a text file or a list of
texts), discovers the units, builds the :class:`~sensitivity.EstimateContext`, runs the named
estimator and records the provenance in the table metadata. The spec's execution decides how:
the whole model in this process, one block at a time (``sequential``,
:mod:`sensitivity._sequential`) or in shards over worker processes (``sharding``,
:mod:`sensitivity._sharded`); all three seed the same way and record the same provenance keys
(:data:`PROVENANCE_KEYS`).

Determinism: the sample order, the probes and every other random draw derive from ``seed``;
torch's global RNG is seeded too (and restored afterwards) for anything an estimator or a model
draws from it. A seeded run on the same machine reproduces the same table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.table import CostTable
from allocator.core.units import UnitKind
from sensitivity._spec import EstimateSpec

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.data import CalibrationData
    from allocator.model.loading import LoadedModel
    from allocator.model.quant import Quantizer
    from sensitivity._base import BaseEstimator, EstimateContext

__all__ = ["PROVENANCE_KEYS", "PreparedEstimate", "load_data", "plan_quantizer", "prepare", "provenance",
           "run_prepared", "seeded", "spec_units"]

#: what every table's metadata records about where it came from, whichever execution built it
PROVENANCE_KEYS = ("method", "model", "model_path", "model_kind", "model_fingerprint", "units_count",
                   "filters", "data", "data_fingerprint", "quantizer")

log = logging.getLogger(__name__)


def load_data(
    data: str | Path | Sequence[str] | CalibrationData | None, tokenizer: Any, *, kind: str,
    samples: int, seq_len: int, batch_size: int, seed: int,
) -> CalibrationData:
    """Calibration batches from the built-in corpus (``None``), a text file or a list of texts.

    Encoders need ≥ 2 texts per batch (in-batch negatives of the contrastive loss): a last batch
    of one text is merged into the batch before it.
    """
    from allocator.model.data import CalibrationData, parse_builtin

    if isinstance(data, CalibrationData):
        cal = data
    elif data is None or isinstance(data, str | Path):
        if data is not None and not parse_builtin(data)[0] and not Path(data).is_file():
            raise InvalidParameterError(f"data file {str(data)!r} does not exist; pass a text "
                                        "file (.txt paragraphs or .jsonl), builtin:DOMAIN, or omit "
                                        "--data for the built-in mix")
        cal = CalibrationData.from_path(data, tokenizer, n_samples=samples, seq_len=seq_len,
                                        batch_size=batch_size, seed=seed)
    else:
        texts = list(data)
        if not texts:
            raise InvalidParameterError("data is an empty list of texts; pass texts, a file or None")
        cal = CalibrationData.from_texts(texts, tokenizer, n_samples=samples, seq_len=seq_len,
                                         batch_size=batch_size, seed=seed)
    if kind == "encoder":
        cal = _merge_single_last(cal)
    return cal


def _merge_single_last(cal: CalibrationData) -> CalibrationData:
    import dataclasses

    import torch

    if len(cal.batches) < 2 or int(cal.batches[-1]["input_ids"].shape[0]) != 1:
        if int(cal.batches[0]["input_ids"].shape[0]) < 2:
            raise InvalidParameterError("an encoder's contrastive loss needs ≥ 2 calibration texts "
                                        "per batch; raise samples / batch_size")
        return cal
    a, b = cal.batches[-2], cal.batches[-1]
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    pad_id = int(b["input_ids"][0, -1]) if int(b["attention_mask"][0, -1]) == 0 else 0
    merged = {"input_ids": torch.cat([pad(a["input_ids"], pad_id), pad(b["input_ids"], pad_id)]),
              "attention_mask": torch.cat([pad(a["attention_mask"], 0), pad(b["attention_mask"], 0)])}
    return dataclasses.replace(cal, batches=(*cal.batches[:-2], merged))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the run and restore its state afterwards."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedEstimate:
    """What :func:`prepare` builds: :func:`run_prepared` runs it (or the sharded runner splits
    ``ctx`` into shards first)."""

    loaded: LoadedModel
    estimator: BaseEstimator
    ctx: EstimateContext
    metadata: dict[str, Any]
    spec: EstimateSpec


def provenance(spec: EstimateSpec, *, name: str, path: str, kind: str, fingerprint: str,
                n_units: int, calibration: Any) -> dict[str, Any]:
    """The :data:`PROVENANCE_KEYS` of one estimate (every execution ends here)."""
    meta = {"method": spec.method, "model": name, "model_path": path, "model_kind": kind,
            "model_fingerprint": fingerprint, "units_count": n_units, "filters": spec.filters(),
            "data": calibration.metadata() if calibration is not None else None,
            "data_fingerprint": calibration.fingerprint if calibration is not None else None,
            "quantizer": spec.quantizer}
    return meta


def _build(loaded: LoadedModel, spec: EstimateSpec, *, units: Sequence[Unit],
           calibration: Any, quantizer: Quantizer | None = None) -> PreparedEstimate:
    """The context and the provenance of one estimate of ``loaded`` on ``calibration`` (ready
    batches with ``fingerprint`` / ``metadata()``, or None for a data-free run). ``quantizer``:
    one already built (``run`` shares it with refinement), else ``spec.quantizer`` built here."""
    from sensitivity._base import EstimateContext

    estimator = spec.estimator()
    kind = str(loaded.kind)
    batches = list(calibration) if calibration is not None else []
    if quantizer is None:
        quantizer = plan_quantizer(spec.quantizer, loaded, units, batches)
    elif quantizer.name != spec.quantizer:
        raise InvalidParameterError(f"the quantizer given is {quantizer.name!r} but the spec says "
                                    f"{spec.quantizer!r}; make them agree")
    ctx = EstimateContext(batches=batches, units=list(units), options=spec.formats(), seed=spec.seed,
                          device=spec.device, model_kind=kind, progress=spec.progress,
                          quantizer=quantizer)
    meta = provenance(spec, name=loaded.name, path=loaded.path, kind=kind,
                       fingerprint=loaded.fingerprint, n_units=len(ctx.units), calibration=calibration)
    return PreparedEstimate(loaded=loaded, estimator=estimator, ctx=ctx, metadata=meta, spec=spec)


def plan_quantizer(name: str, loaded: LoadedModel, units: Sequence[Unit],
                   batches: Sequence[Any]) -> Quantizer:
    """The quantizer ``name`` for ``units`` of ``loaded`` (GPTQ: Hessians from ``batches``, at
    full precision, in eval mode)."""
    from allocator.model.quant import build_quantizer

    if name == "gptq" and not batches:
        raise InvalidParameterError(f"quantizer {name!r} needs calibration data; pass --data or "
                                    "use the built-in corpus")
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        return build_quantizer(name, model, units, batches, kind=str(loaded.kind))
    finally:
        model.train(was_training)


def spec_units(model: Any, spec: EstimateSpec) -> list[Unit]:
    """The units of ``spec``: discovered (kinds, groups), kept by the globs (one syntax with
    ``run``: :mod:`allocator.model.unit_select`), then ``spec.units`` when it names them."""
    from allocator.core.units import discover_units
    from allocator.model.unit_select import filter_units

    kept = filter_units(discover_units(model, kinds=[UnitKind(k) for k in spec.kinds],
                                       group_columns=spec.groups),
                        spec.include, spec.exclude).units
    if spec.units is None:
        return list(kept)
    names = {u.name for u in kept}
    missing = [n for n in spec.units if n not in names]
    if missing:
        raise InvalidParameterError(f"unit {missing[0]!r} is not among the {len(names)} units the "
                                    f"filters keep; pass names from the model's units or drop it")
    wanted = set(spec.units)
    return [u for u in kept if u.name in wanted]


def prepare(model: str | Path | LoadedModel | None, spec: EstimateSpec, *,
            quantizer: Quantizer | None = None) -> PreparedEstimate:
    """Load the model and data of ``spec``, pick the units and build the context; nothing is
    estimated yet (the sharded runner splits ``ctx`` before running it)."""
    from sensitivity._registry import estimator_class

    # a data-free estimator still needs data for a quantizer that learns from it (GPTQ)
    needs_data = estimator_class(spec.method).needs_data or spec.quantizer != "rtn"
    loaded = _load(model, spec.device)
    units = spec_units(loaded.model, spec)
    cal = None
    if needs_data:
        cal = _image_data(spec.data, loaded, samples=spec.samples, batch_size=spec.batch_size,
                          seed=spec.seed)
        if cal is None:
            cal = load_data(spec.data, loaded.tokenizer, kind=str(loaded.kind),
                            samples=spec.samples, seq_len=spec.seq_len,
                            batch_size=spec.batch_size, seed=spec.seed)
        cal = cal.to(spec.device)
    return _build(loaded, spec, units=units, calibration=cal, quantizer=quantizer)


def run_prepared(prep: PreparedEstimate) -> CostTable:
    """Run a prepared estimate under its seed (torch's RNG restored afterwards); the table's
    metadata gains ``seconds``."""
    start = time.perf_counter()
    with seeded(prep.spec.seed):
        table = prep.estimator.estimate(prep.loaded.model, prep.ctx, metadata=prep.metadata)
    seconds = time.perf_counter() - start
    log.info("%s: %d units × %d options in %.1f s", prep.spec.method, len(prep.ctx.units),
             len(prep.ctx.options), seconds)
    return CostTable(table.df, {**table.metadata, "seconds": round(seconds, 3)})


def _image_data(data: Any, loaded: LoadedModel, *, samples: int, batch_size: int,
                seed: int) -> Any:
    """Digits images for the bundled ViT classifier (given, or its calibration split when
    ``data`` is None); None for every other model / data (text batches)."""
    from allocator.model.data import DigitsData
    from allocator.model.data.images import uses_digits

    if isinstance(data, DigitsData):
        return data
    if data is None and uses_digits(loaded):
        return DigitsData.from_split("calibration", n_samples=samples, batch_size=batch_size,
                                     seed=seed)
    return None


def _load(model: str | Path | LoadedModel | None, device: str) -> LoadedModel:
    from allocator.model.loading import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        model.model.to(device)  # a no-op when it is already there
        return model
    return load_model(model, device=device)
