"""The high-level driver: (model, data, options, filters, method) → validated CostTable.

:func:`run_estimate` loads the model (:func:`allocator.models.load_model`) and calibration
batches (:class:`allocator.data.CalibrationData`: the built-in corpus, a text file or a list of
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

from allocator.errors import InvalidParameterError
from allocator.formats import QuantFormat, parse_options
from allocator.table import CostTable
from allocator.units import UnitKind

if TYPE_CHECKING:
    import torch

    from allocator.data import CalibrationData
    from allocator.models import LoadedModel
    from sensitivity._base import BaseEstimator, EstimateContext

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "PreparedEstimate",
    "load_data",
    "prepare_estimate",
    "run_estimate",
    "seeded",
]

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8


def _options(options: str | Sequence[str] | Sequence[QuantFormat] | None) -> tuple[QuantFormat, ...]:
    if options is None or isinstance(options, str):
        return parse_options(options)
    items = list(options)
    if not items:
        raise InvalidParameterError("options is empty; pass at least one option label")
    if all(isinstance(o, QuantFormat) for o in items):
        return tuple(o for o in items if isinstance(o, QuantFormat))
    return parse_options(",".join(str(o) for o in items))


def load_data(
    data: str | Path | Sequence[str] | CalibrationData | None, tokenizer: Any, *, kind: str,
    samples: int, seq_len: int, batch_size: int, seed: int,
) -> CalibrationData:
    """Calibration batches from the built-in corpus (``None``), a text file or a list of texts.

    Encoders need ≥ 2 texts per batch (in-batch negatives of the contrastive loss): a last batch
    of one text is merged into the batch before it.
    """
    from allocator.data import CalibrationData

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


def _check(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(f"{name} must be an int ≥ {low}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedEstimate:
    """What :func:`prepare_estimate` builds: run ``estimator.estimate(loaded.model, ctx,
    metadata=metadata)`` to get the table (or split ``ctx.units`` into shards first)."""

    loaded: LoadedModel
    estimator: BaseEstimator
    ctx: EstimateContext
    metadata: dict[str, Any]


def prepare_estimate(
    model: str | Path | LoadedModel | None = None,
    *,
    method: str,
    data: str | Path | Sequence[str] | CalibrationData | None = None,
    options: str | Sequence[str] | Sequence[QuantFormat] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include: str | None = None,
    exclude: str | None = None,
    groups: int | None = None,
    kinds: Sequence[str] = ("linear",),
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    estimator_params: Mapping[str, Any] | None = None,
) -> PreparedEstimate:
    """Load the model and data, discover the units and build the context (see
    :func:`run_estimate` for the arguments); nothing is estimated yet."""
    from sensitivity import EstimateContext, get_estimator

    _check("seed", seed, 0)
    _check("samples", samples, 1)
    _check("seq_len", seq_len, 2)
    _check("batch_size", batch_size, 1)
    if groups is not None:
        _check("groups", groups, 1)
    estimator = get_estimator(method, **dict(estimator_params or {}))
    fmts = _options(options)
    kind_list = [UnitKind(k) if k in {u.value for u in UnitKind} else _bad_kind(k) for k in kinds]
    loaded = _load(model, device)
    from allocator.units import discover_units

    units = discover_units(loaded.model, include=include, exclude=exclude, kinds=kind_list,
                           group_columns=groups)
    kind = str(loaded.kind)
    cal = None
    if estimator.needs_data:
        cal = _image_data(data, loaded, samples=samples, batch_size=batch_size, seed=seed)
        if cal is None:
            cal = load_data(data, loaded.tokenizer, kind=kind, samples=samples, seq_len=seq_len,
                            batch_size=batch_size, seed=seed)
        cal = cal.to(device)
    ctx = EstimateContext(batches=list(cal.batches) if cal is not None else [], units=units,
                          options=fmts, seed=seed, device=device, model_kind=kind,
                          progress=progress)
    meta: dict[str, Any] = {
        "method": method, "model": loaded.name, "model_path": loaded.path, "model_kind": kind,
        "model_fingerprint": loaded.fingerprint, "units_count": len(units),
        "filters": {"include": include, "exclude": exclude, "groups": groups,
                    "kinds": [str(k) for k in kind_list]},
        "data": cal.metadata() if cal is not None else None,
        "data_fingerprint": cal.fingerprint if cal is not None else None,
    }
    return PreparedEstimate(loaded=loaded, estimator=estimator, ctx=ctx, metadata=meta)


def run_estimate(
    model: str | Path | LoadedModel | None = None,
    *,
    method: str,
    data: str | Path | Sequence[str] | CalibrationData | None = None,
    options: str | Sequence[str] | Sequence[QuantFormat] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include: str | None = None,
    exclude: str | None = None,
    groups: int | None = None,
    kinds: Sequence[str] = ("linear",),
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    estimator_params: Mapping[str, Any] | None = None,
) -> CostTable:
    """Estimate a cost table for ``model`` with the estimator named ``method``.

    Args:
        model: a local Hugging Face model directory, ``"minilm"`` / ``"tiny-llama"`` (bundled),
            a :class:`~allocator.models.LoadedModel`, or None (MiniLM).
        method: estimator name (``sensitivity.ESTIMATORS``).
        data: None (built-in corpus, calibration split), a text file (.txt: one text per
            blank-line-separated paragraph; .jsonl: a "text" field per line), a
            list of texts, or ready :class:`~allocator.data.CalibrationData`.
        options: option spec (``"int2..8-g128-asym,fp16"``), labels or formats; None = default.
        samples, seq_len, batch_size: calibration size (texts, tokens per text, texts per batch).
        include, exclude: regexes on module names; groups: split weights into groups of this
            many input columns (SliM-LLM style units); kinds: module kinds to quantize.
        seed: seeds data order, probes and torch's RNG (restored afterwards).
        device: where the model and batches run (``cpu``, ``cuda``, ``cuda:1``).
        progress: show progress bars (stderr).
        estimator_params: keyword arguments of the estimator's constructor.

    Raises:
        UnknownNameError, InvalidParameterError, ModelError: with one-line messages.
    """
    prep = prepare_estimate(model, method=method, data=data, options=options, samples=samples,
                            seq_len=seq_len, batch_size=batch_size, include=include,
                            exclude=exclude, groups=groups, kinds=kinds, seed=seed, device=device,
                            progress=progress, estimator_params=estimator_params)
    start = time.perf_counter()
    with seeded(seed):
        table = prep.estimator.estimate(prep.loaded.model, prep.ctx, metadata=prep.metadata)
    seconds = time.perf_counter() - start
    log.info("%s: %d units × %d options in %.1f s", method, len(prep.ctx.units),
             len(prep.ctx.options), seconds)
    return CostTable(table.df, {**table.metadata, "seconds": round(seconds, 3)})


def _image_data(data: Any, loaded: LoadedModel, *, samples: int, batch_size: int,
                seed: int) -> Any:
    """Digits images for the bundled ViT classifier (given, or its calibration split when
    ``data`` is None); None for every other model / data (text batches)."""
    from allocator.data import DigitsData
    from allocator.data.images import uses_digits

    if isinstance(data, DigitsData):
        return data
    if data is None and uses_digits(loaded):
        return DigitsData.from_split("calibration", n_samples=samples, batch_size=batch_size,
                                     seed=seed)
    return None


def _bad_kind(k: str) -> UnitKind:
    raise InvalidParameterError(f"unknown unit kind {k!r}; use one of {[u.value for u in UnitKind]}")


def _load(model: str | Path | LoadedModel | None, device: str) -> LoadedModel:
    from allocator.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        model.model.to(device)  # a no-op when it is already there
        return model
    return load_model(model, device=device)
