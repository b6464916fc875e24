"""One estimate request, validated once: :class:`EstimateSpec`.

The CLI (``bitalloc estimate``), the Python API (:func:`sensitivity.run_estimate`,
:func:`sensitivity.prepare_estimate`), the sharded runner (:class:`sensitivity.ShardedEstimateSpec`),
``run`` / ``demo`` (:func:`allocator.jobs.pipeline.estimate_table`) and the service's ``estimate`` job
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
    "EstimateSpec",
    "check_estimator_params",
    "estimator_parameters",
]

DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8

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


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(f"{name} must be an int ≥ {low}, got {value!r}")


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
        seed: seeds data order, probes and torch's RNG (restored afterwards).
        device: where the model and batches run (``cpu``, ``cuda``, ``cuda:1``).
        progress: show progress bars (stderr).
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
    device: str = "cpu"
    progress: bool = True

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
        self.formats()  # a malformed option spec fails here, before any model is loaded
        check_estimator_params(self.method, self.params)
        self.estimator()  # and so does a bad parameter value (constructors only check and store)

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
