"""One estimate request, validated once: :class:`EstimateSpec`.

The CLI (``bitalloc estimate``), the Python API (:func:`sensitivity.estimate`, which also runs the
sequential and sharded executions the spec asks for), ``run`` / ``demo``
(:func:`allocator.jobs.pipeline.estimate_table`) and the service's ``estimate`` job
all describe what to estimate with this one frozen object, so a parameter means the same thing
(and is checked the same way) wherever it comes from.

Estimator parameters are checked by name against the keyword parameters the estimator's
constructor declares (:func:`estimator_parameters`), before any model is loaded: an unknown one
is an :class:`~allocator.core.errors.InvalidParameterError` naming it and listing the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat, parse_options
from allocator.core.units import UnitKind
from allocator.model.unit_select import check_patterns

if TYPE_CHECKING:
    from sensitivity._base import BaseEstimator

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SHARDS_STALE_S",
    "EstimateSpec",
    "Execution",
    "Sharding",
    "check_estimator_params",
    "check_shardable",
    "estimator_parameters",
    "sharded_methods",
]

DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8
#: a running shard with no heartbeat for this long is handed to another worker
DEFAULT_SHARDS_STALE_S = 120.0

#: Anything :func:`sensitivity._driver.load_data` takes: None (built-in corpus / the model's own
#: data), a text file, a list of texts, or ready calibration data (CalibrationData, DigitsData).
DataSource = Any


def estimator_parameters(cls: type[BaseEstimator]) -> frozenset[str] | None:
    """Names of the keyword parameters ``cls``'s constructor declares; None when it takes
    ``**kwargs`` (anything goes). An estimator without its own ``__init__`` declares none."""
    if cls.__init__ is object.__init__:
        return frozenset()
    sig = inspect.signature(cls)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return frozenset(n for n, p in sig.parameters.items()
                     if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                   inspect.Parameter.POSITIONAL_OR_KEYWORD))


def parse_estimator_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["max_probes=50", "probe_mode=loop"]`` → ``{"max_probes": 50, "probe_mode": "loop"}``:
    each value read as JSON where it parses (numbers, true / false), else kept as a string
    (``bitalloc estimate --param``, the benchmarks' estimator options)."""
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(f"an estimator parameter is KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare word is a string (probe_mode=loop)
    return out


def check_estimator_params(method: str, params: Mapping[str, Any]) -> None:
    """Raise one-line InvalidParameterError / UnknownNameError for an unknown estimator or an
    estimator parameter its constructor does not declare."""
    from sensitivity._registry import estimator_class

    cls = estimator_class(method)
    declared = estimator_parameters(cls)
    if declared is None:
        return
    for name in params:
        if name not in declared:
            valid = ", ".join(sorted(declared)) if declared else "none"
            raise InvalidParameterError(f"estimator {method!r} has no parameter {name!r}; "
                                        f"its parameters are: {valid}")


def sharded_methods() -> tuple[str, ...]:
    """The registered methods that shard with their default parameters: ``measured`` (by unit)
    and every batch-additive estimator (by batch)."""
    from sensitivity._registry import ESTIMATORS, get_estimator

    return tuple(n for n in ESTIMATORS if n == "measured" or get_estimator(n).batch_additive())


def check_shardable(spec: EstimateSpec) -> None:
    """Refuse an estimator that can be sharded neither by unit nor by batch (one line)."""
    if spec.method == "measured" or spec.estimator().batch_additive():
        return
    params = f" with {dict(spec.params)}" if spec.params else ""
    raise InvalidParameterError(
        f"{spec.method!r}{params} is not batch-additive, so it cannot be sharded; shardable: "
        f"{', '.join(sharded_methods())}")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(f"{name} must be an int ≥ {low}, got {value!r}")


class Execution(StrEnum):
    """How an estimate runs (:attr:`EstimateSpec.execution`)."""

    WHOLE = "whole"  #: the whole model in memory, one process
    SEQUENTIAL = "sequential"  #: one transformer block in memory, read from the safetensors
    SHARDED = "sharded"  #: shards claimed by worker processes that share an Optuna storage


@dataclass(frozen=True, kw_only=True)
class Sharding:
    """The shard queue of a sharded estimate (:mod:`sensitivity._sharded`).

    Attributes:
        storage: Optuna storage URL (``sqlite:///estimate.db``, ``postgresql://...``); None: in
            memory, this process only.
        study: names the study ``estimate-<study>`` (default: the fingerprint's first 12 hex
            digits, so identical commands meet in one study).
        n_shards: shards in the queue (None: the study's count when joining, else
            ``SHARDS_PER_WORKER`` × ``workers``).
        workers: processes on this machine (others may join with the same spec).
        stale_after_s: requeue a running shard whose heartbeat is older than this.
        wait: poll until every shard is complete (taking over stale ones), every ``poll_s``.
        max_shards: stop each local worker after this many shards (None: no limit).
    """

    storage: str | None = None
    study: str | None = None
    n_shards: int | None = None
    workers: int = 1
    stale_after_s: float = DEFAULT_SHARDS_STALE_S
    wait: bool = False
    poll_s: float = 5.0
    max_shards: int | None = None

    def __post_init__(self) -> None:
        import sensitivity.shard_queue as shard_queue

        if self.n_shards is not None:
            _int("shards", self.n_shards, 1)
        _int("workers", self.workers, 1)
        if self.max_shards is not None:
            _int("max_shards", self.max_shards, 1)
        if not self.stale_after_s > 0:
            raise InvalidParameterError(f"stale_after_s must be > 0, got {self.stale_after_s!r}")
        if not self.poll_s > 0:
            raise InvalidParameterError(f"poll_s must be > 0, got {self.poll_s!r}")
        if self.study is not None and not self.study.strip():
            raise InvalidParameterError("study name is empty; pass --study NAME or omit it")
        shard_queue.storage_kind(self.storage)  # a malformed URL fails here, before any model loads
        if self.workers > 1 and self.storage is None:
            raise InvalidParameterError("several workers need shared storage: pass --storage "
                                        "sqlite:///estimate.db or a PostgreSQL URL")


@dataclass(frozen=True, kw_only=True, eq=False)
class EstimateSpec:
    """What to estimate (everything but the model itself).

    Attributes:
        method: estimator name (``sensitivity.ESTIMATORS``).
        params: keyword arguments of the estimator's constructor (checked by name).
        data: None (built-in corpus, or the model's own data), a text file (.txt / .jsonl), a
            list of texts, or ready calibration data.
        options: option spec (``"int2..8-g128-asym,fp16"``), labels or formats; None = default.
        samples, seq_len, batch_size: calibration size (texts, tokens per text, texts per batch).
        include, exclude: glob patterns on unit names (one string or several; a module
            selects everything under it), as ``bitalloc run`` takes them
            (:func:`allocator.model.unit_select.filter_units`); stored as a tuple. groups: split
            weights into groups of this many input columns; kinds: module kinds to quantize.
        units: exactly these unit names (in model order) among those the filters keep; None:
            all of them (``run`` passes the units it selected, inert ones left out).
        seed: seeds data order, probes and torch's RNG (restored afterwards).
        device: where the model and batches run (``cpu``, ``cuda``, ``cuda:1``).
        progress: show progress bars (stderr).
        quantizer: how ΔW = Q_o(W) − W is formed: ``rtn`` (default) or ``gptq`` (GPTQ of each
            unit from its input Hessian on the calibration data; docs/quantizer.md).
        sequential: one transformer block in memory at a time, read from the model directory's
            safetensors (``sensitivity.SEQUENTIAL`` estimators; ``docs/sequential.md``).
        sharding: split the work over worker processes sharing an Optuna storage
            (:class:`Sharding`; ``measured`` by unit, the batch-additive estimators by batch).
    """

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    data: DataSource = None
    options: str | Sequence[str] | Sequence[QuantFormat] | None = None
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    include: str | Sequence[str] | None = ()
    exclude: str | Sequence[str] | None = ()
    groups: int | None = None
    kinds: tuple[str, ...] = ("linear",)
    seed: int = 0
    units: Sequence[str] | None = None
    device: str = "cpu"
    progress: bool = True
    quantizer: str = "rtn"
    sequential: bool = False
    sharding: Sharding | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise InvalidParameterError(f"method must be an estimator name, got {self.method!r}")
        if not isinstance(self.params, Mapping):
            raise InvalidParameterError(
                f"estimator params must be a mapping of name → value, got {self.params!r}")
        object.__setattr__(self, "params", dict(self.params))
        _int("seed", self.seed, 0)
        _int("samples", self.samples, 1)
        _int("seq_len", self.seq_len, 2)
        _int("batch_size", self.batch_size, 1)
        if self.groups is not None:
            _int("groups", self.groups, 1)
        # one glob syntax with `run` (a lone string is one pattern, as the old single regex was)
        object.__setattr__(self, "include", check_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", check_patterns(self.exclude, "exclude"))
        if not isinstance(self.device, str) or not self.device:
            raise InvalidParameterError(f"device must be a name like 'cpu' or 'cuda:0', got "
                                        f"{self.device!r}")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        known = [k.value for k in UnitKind]
        for k in kinds:
            if k not in known:
                raise InvalidParameterError(f"unknown unit kind {k!r}; use one of {known}")
        object.__setattr__(self, "kinds", kinds)
        if isinstance(self.data, Path | str) and not str(self.data):
            raise InvalidParameterError("data path is empty; pass a text file or omit it")
        from allocator.model.quant import QUANTIZERS

        if self.quantizer not in QUANTIZERS:
            raise InvalidParameterError(f"quantizer {self.quantizer!r} is unknown; choose one of "
                                        f"{', '.join(QUANTIZERS)}")
        self.formats()  # a malformed option spec fails here, before any model is loaded
        check_estimator_params(self.method, self.params)
        self.estimator()  # and so does a bad parameter value (constructors only check and store)
        if self.units is not None:
            names = (self.units,) if isinstance(self.units, str) else tuple(self.units)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise InvalidParameterError(f"units must be unit names (omit it for every unit), "
                                            f"got {self.units!r}")
            object.__setattr__(self, "units", names)
        self._check_execution()

    def _check_execution(self) -> None:
        if not isinstance(self.sequential, bool):
            raise InvalidParameterError(f"sequential must be true or false, got {self.sequential!r}")
        if self.sequential and self.quantizer != "rtn":
            raise InvalidParameterError(f"a sequential estimate forms ΔW with rtn only, got quantizer "
                                        f"{self.quantizer!r}; drop --sequential or the quantizer")
        if self.sharding is None:
            return
        if not isinstance(self.sharding, Sharding):
            raise InvalidParameterError(f"sharding must be a sensitivity.Sharding, got {self.sharding!r}")
        if self.sequential:
            raise InvalidParameterError("sequential runs in one process; drop the sharding "
                                        "(--storage / --workers) or --sequential")
        check_shardable(self)
        if self.params.get("workers", 1) != 1:
            raise InvalidParameterError("--param workers is the in-process pool; with --storage "
                                        "use --workers W (processes sharing the queue)")

    @property
    def execution(self) -> Execution:
        """Whole model, block by block, or sharded (the driver dispatches on it)."""
        if self.sharding is not None:
            return Execution.SHARDED
        return Execution.SEQUENTIAL if self.sequential else Execution.WHOLE

    def formats(self) -> tuple[QuantFormat, ...]:
        """The candidate options, parsed."""
        options = self.options
        if options is None or isinstance(options, str):
            return parse_options(options)
        items = list(options)
        if not items:
            raise InvalidParameterError("options is empty; pass at least one option label")
        if all(isinstance(o, QuantFormat) for o in items):
            return tuple(o for o in items if isinstance(o, QuantFormat))
        return parse_options(",".join(str(o) for o in items))

    def estimator(self) -> BaseEstimator:
        """A fresh estimator instance for :attr:`method` with :attr:`params`."""
        from sensitivity._registry import get_estimator

        return get_estimator(self.method, **dict(self.params))

    def filters(self) -> dict[str, Any]:
        """The unit filters as recorded in the table metadata."""
        return {"include": list(self.include or ()) or None,
                "exclude": list(self.exclude or ()) or None, "groups": self.groups,
                "kinds": list(self.kinds)}

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))
