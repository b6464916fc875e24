"""The high-level driver: (model, :class:`~sensitivity.EstimateSpec`) → validated CostTable.

:func:`run_estimate` loads the model (:func:`allocator.model.loading.load_model`) and calibration
batches (:class:`allocator.model.data.CalibrationData`: the built-in corpus, a text file or a list of
texts), discovers the units, builds the :class:`~sensitivity.EstimateContext`, runs the named
estimator and records the provenance in the table metadata.

Determinism: the sample order, the probes and every other random draw derive from ``seed``;
torch's global RNG is seeded too (and restored afterwards) for anything an estimator or a model
draws from it. A seeded run on the same machine reproduces the same table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat
from allocator.core.table import CostTable
from allocator.core.units import UnitKind
from sensitivity._spec import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, EstimateSpec

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.data import CalibrationData
    from allocator.model.loading import LoadedModel
    from allocator.model.quant import Quantizer
    from sensitivity._base import BaseEstimator, EstimateContext

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "PreparedEstimate",
    "build_estimate",
    "estimate_loaded",
    "estimate_spec",
    "load_data",
    "prepare",
    "prepare_estimate",
    "run_estimate",
    "run_prepared",
    "seeded",
]

log = logging.getLogger(__name__)


def load_data(
    data: str | Path | Sequence[str] | CalibrationData | None, tokenizer: Any, *, kind: str,
    samples: int, seq_len: int, batch_size: int, seed: int,
) -> CalibrationData:
    """Calibration batches from the built-in corpus (``None``), a text file or a list of texts.

    Encoders need ≥ 2 texts per batch (in-batch negatives of the contrastive loss): a last batch
    of one text is merged into the batch before it.
    """
    from allocator.model.data import CalibrationData

    if isinstance(data, CalibrationData):
        cal = data
    elif data is None or isinstance(data, str | Path):
        if data is not None and not Path(data).is_file():
            raise InvalidParameterError(f"data file {str(data)!r} does not exist; pass a text "
                                        "file (.txt paragraphs or .jsonl) or omit --data for the corpus")
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
    """What :func:`prepare_estimate` builds: :func:`run_prepared` runs it (or the sharded runner
    splits ``ctx.units`` into shards first)."""

    loaded: LoadedModel
    estimator: BaseEstimator
    ctx: EstimateContext
    metadata: dict[str, Any]
    spec: EstimateSpec


def build_estimate(loaded: LoadedModel, spec: EstimateSpec, *, units: Sequence[Unit],
                   calibration: Any, quantizer: Quantizer | None = None) -> PreparedEstimate:
    """The context and the provenance of one estimate of ``loaded`` on ``calibration`` (ready
    batches with ``fingerprint`` / ``metadata()``, or None for a data-free run), as given.
    ``quantizer``: one already built (``run`` shares it with refinement), else ``spec.quantizer``
    is built here on ``calibration``.

    Every estimate path ends here (CLI, Python API, sharding, ``run`` / ``demo``, the service),
    so tables record the same provenance keys whichever command built them.
    """
    from sensitivity import EstimateContext

    estimator = spec.estimator()
    kind = str(loaded.kind)
    batches = list(calibration) if calibration is not None else []
    if quantizer is None:
        quantizer = plan_quantizer(spec.quantizer, loaded, units, batches)
    ctx = EstimateContext(batches=batches, units=list(units), options=spec.formats(), seed=spec.seed,
                          device=spec.device, model_kind=kind, progress=spec.progress,
                          quantizer=quantizer)
    meta: dict[str, Any] = {
        "method": spec.method, "model": loaded.name, "model_path": loaded.path, "model_kind": kind,
        "model_fingerprint": loaded.fingerprint, "units_count": len(ctx.units),
        "filters": spec.filters(),
        "data": calibration.metadata() if calibration is not None else None,
        "data_fingerprint": calibration.fingerprint if calibration is not None else None,
        "quantizer": quantizer.name,
    }
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


def prepare(model: str | Path | LoadedModel | None, spec: EstimateSpec) -> PreparedEstimate:
    """Load the model and data of ``spec``, discover the units and build the context; nothing
    is estimated yet."""
    from allocator.core.units import discover_units
    from allocator.model.unit_select import filter_units
    from sensitivity import estimator_class

    # a data-free estimator still needs data for a quantizer that learns from it (GPTQ)
    needs_data = estimator_class(spec.method).needs_data or spec.quantizer != "rtn"
    loaded = _load(model, spec.device)
    # the globs select among all units (allocator.model.unit_select: one syntax with `run`)
    units = filter_units(discover_units(loaded.model, kinds=[UnitKind(k) for k in spec.kinds],
                                        group_columns=spec.groups),
                         spec.include, spec.exclude).units
    cal = None
    if needs_data:
        cal = _image_data(spec.data, loaded, samples=spec.samples, batch_size=spec.batch_size,
                          seed=spec.seed)
        if cal is None:
            cal = load_data(spec.data, loaded.tokenizer, kind=str(loaded.kind),
                            samples=spec.samples, seq_len=spec.seq_len,
                            batch_size=spec.batch_size, seed=spec.seed)
        cal = cal.to(spec.device)
    return build_estimate(loaded, spec, units=units, calibration=cal)


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


def estimate_spec(model: str | Path | LoadedModel | None, spec: EstimateSpec) -> CostTable:
    """Estimate a cost table for ``model`` as ``spec`` says (see :class:`EstimateSpec`)."""
    return run_prepared(prepare(model, spec))


def estimate_loaded(loaded: LoadedModel, spec: EstimateSpec, *, units: Sequence[Unit],
                    calibration: Any, quantizer: Quantizer | None = None) -> CostTable:
    """Estimate on a model, units and calibration batches the caller already has (``run`` /
    ``demo``), with the same seeding and provenance as :func:`estimate_spec`; ``quantizer``
    as in :func:`build_estimate`."""
    return run_prepared(build_estimate(loaded, spec, units=units, calibration=calibration,
                                       quantizer=quantizer))


def prepare_estimate(
    model: str | Path | LoadedModel | None = None,
    *,
    method: str,
    data: str | Path | Sequence[str] | CalibrationData | None = None,
    options: str | Sequence[str] | Sequence[QuantFormat] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    groups: int | None = None,
    kinds: Sequence[str] = ("linear",),
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    estimator_params: Mapping[str, Any] | None = None,
    quantizer: str = "rtn",
) -> PreparedEstimate:
    """:func:`prepare` with the :class:`EstimateSpec` spelled out as keyword arguments (see
    :func:`run_estimate`)."""
    spec = EstimateSpec(method=method, params=dict(estimator_params or {}), data=data,
                        options=options, samples=samples, seq_len=seq_len, batch_size=batch_size,
                        include=include, exclude=exclude, groups=groups, kinds=tuple(kinds),
                        seed=seed, device=device, progress=progress, quantizer=quantizer)
    return prepare(model, spec)


def run_estimate(
    model: str | Path | LoadedModel | None = None,
    *,
    method: str,
    data: str | Path | Sequence[str] | CalibrationData | None = None,
    options: str | Sequence[str] | Sequence[QuantFormat] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    groups: int | None = None,
    kinds: Sequence[str] = ("linear",),
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    estimator_params: Mapping[str, Any] | None = None,
    quantizer: str = "rtn",
) -> CostTable:
    """Estimate a cost table for ``model`` with the estimator named ``method``.

    The keyword arguments are the fields of :class:`EstimateSpec` (``estimator_params`` is its
    ``params``); :func:`estimate_spec` takes a ready spec.

    Args:
        model: a local Hugging Face model directory, ``"minilm"`` / ``"tiny-llama"`` (bundled),
            a :class:`~allocator.model.loading.LoadedModel`, or None (MiniLM).
        method: estimator name (``sensitivity.ESTIMATORS``).
        data: None (built-in corpus, calibration split), a text file (.txt: one text per
            blank-line-separated paragraph; .jsonl: a "text" field per line), a
            list of texts, or ready :class:`~allocator.model.data.CalibrationData`.
        options: option spec (``"int2..8-g128-asym,fp16"``), labels or formats; None = default.
        samples, seq_len, batch_size: calibration size (texts, tokens per text, texts per batch).
        include, exclude: glob patterns on unit names, one or several (``'*.attention.*'``,
            ``'pooler'``: a module selects everything under it), as ``bitalloc run`` takes
            them; groups: split weights into groups of this many input columns (SliM-LLM
            style units); kinds: module kinds to quantize.
        seed: seeds data order, probes and torch's RNG (restored afterwards).
        device: where the model and batches run (``cpu``, ``cuda``, ``cuda:1``).
        progress: show progress bars (stderr).
        estimator_params: keyword arguments of the estimator's constructor (checked by name).
        quantizer: ``rtn`` (default) or ``gptq``: the quantizer every ΔW is formed with.

    Raises:
        UnknownNameError, InvalidParameterError, ModelError: with one-line messages.
    """
    return run_prepared(prepare_estimate(
        model, method=method, data=data, options=options, samples=samples, seq_len=seq_len,
        batch_size=batch_size, include=include, exclude=exclude, groups=groups, kinds=kinds,
        seed=seed, device=device, progress=progress, estimator_params=estimator_params,
        quantizer=quantizer))


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
