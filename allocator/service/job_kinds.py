"""The built-in job kinds, registered on import, and the registry's API re-exported
(:mod:`allocator.service.job_registry`): import the registry from here, so the built-in kinds
are there wherever it is used.

``estimate`` runs :func:`sensitivity.estimate` on a model directory under a configured root;
``search`` runs the Bayesian search (:class:`solvers._bayesian.BayesianSolver`) on a stored
table; ``run`` (:mod:`allocator.service.run_job`) runs ``bitalloc run``'s pipeline. They import
their packages lazily, so a missing package fails the *job* with a stable
code (``estimator_unavailable`` / ``search_unavailable``) and never the worker. Plug-ins and
tests register more kinds with :func:`register_job_kind` from a module named in
``BITALLOC_JOB_MODULES``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from allocator.core.errors import InvalidParameterError
from allocator.service.data_param import refuse_nested_data, service_data
from allocator.service.infra.errors import ServiceError
from allocator.service.job_registry import (
    JOB_KINDS,
    JobCancelled,
    JobFailure,
    JobKind,
    Progress,
    get_job_kind,
    load_job_modules,
    register_job_kind,
)
from allocator.service.model_roots import resolve_model_path
from allocator.service.run_job import RUN_KIND

__all__ = ["JOB_KINDS", "JobCancelled", "JobFailure", "JobKind", "Progress", "estimate_request_keys",
           "estimate_spec_of", "get_job_kind", "load_job_modules", "register_job_kind",
           "resolve_model_path"]

# ----------------------------------------------------------------- estimate
#: keys of an ``estimate`` job that are not fields of the spec
_ESTIMATE_JOB_KEYS = frozenset({"model", "name", "consumer"})
#: spec fields the server decides (progress bars) or refuses (a client picking the worker's
#: database for a shard queue)
_ESTIMATE_SERVER_FIELDS = frozenset({"progress", "sharding"})


def estimate_request_keys() -> frozenset[str]:
    """The keys an ``estimate`` job takes: the :class:`sensitivity.EstimateSpec` fields (``params``
    = the estimator's parameters) but ``progress`` / ``sharding``, plus ``model``, ``name`` and
    ``consumer``; generated from the spec, so a new field is a new job parameter."""
    from sensitivity import EstimateSpec

    return (EstimateSpec.field_names() - _ESTIMATE_SERVER_FIELDS) | _ESTIMATE_JOB_KEYS


def _validate_estimate(params: Mapping[str, Any], roots: list[Path]) -> dict[str, Any]:
    keys = estimate_request_keys()
    unknown = set(params) - keys
    if unknown:
        raise ServiceError(422, "invalid_parameter",
                           f"unknown estimate parameter(s) {sorted(unknown)}; "
                           f"known: {sorted(keys)}")
    out = dict(params)
    out["model"] = str(resolve_model_path(params.get("model"), roots))
    refuse_nested_data(params)  # the calibration text: inline, or a file under a model root
    if "data" in params:
        out["data"] = service_data(params["data"], roots)
    if not isinstance(out.get("method", "datafree"), str):
        raise ServiceError(422, "invalid_parameter", "params.method must be an estimator name")
    device = params.get("device", "cpu")
    # the name only: this process may have no GPU while the workers do (checked there, at run time)
    if not isinstance(device, str) or not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", device):
        raise ServiceError(422, "invalid_parameter", f"params.device {device!r} is not a device "
                           f"name; use cpu, cuda, cuda:N or mps")
    from allocator.model.unit_select import check_patterns

    for key in ("include", "exclude"):  # the globs of `bitalloc run`; a bad one fails at submission
        try:
            check_patterns(params.get(key), f"params.{key}")
        except InvalidParameterError as exc:
            raise ServiceError(422, "invalid_parameter", str(exc)) from None
    from allocator.core.errors import UnknownNameError

    if out.get("consumer") is not None:
        from allocator.export.palettes import palette_options

        try:  # the palette fixes the options: a consumer plus options is refused
            palette_options(str(out["consumer"]), out.get("options"))
        except (UnknownNameError, InvalidParameterError) as exc:
            raise ServiceError(422, "invalid_parameter", f"params.consumer: {exc}") from None
    try:  # every field as the spec checks it, at submission rather than on the worker
        _job_spec(out)
    except ImportError:
        pass  # no estimators in this process: the worker checks (estimator_unavailable)
    except UnknownNameError as exc:
        raise ServiceError(422, "unknown_name", str(exc)) from None
    except InvalidParameterError as exc:
        raise ServiceError(422, "invalid_parameter", f"bad estimate parameters: {exc}") from None
    return out


def estimate_spec_of(params: Mapping[str, Any]) -> Any:
    """The :class:`sensitivity.EstimateSpec` of an ``estimate`` job: every key but ``model``,
    ``name`` and ``consumer`` is the spec field of that name (:func:`estimate_request_keys`);
    ``params`` holds the estimator's parameters only (checked by name against its constructor).
    ``data`` was checked by :func:`allocator.service.data_param.service_data`."""
    from sensitivity import EstimateSpec

    inner = params.get("params", {})
    if not isinstance(inner, Mapping):
        raise InvalidParameterError(f"params.params must be an object, got {inner!r}")
    fields = EstimateSpec.field_names()
    misplaced = sorted(k for k in inner if k in fields or k == "estimator_params")
    if misplaced:
        raise InvalidParameterError(
            f"params.params.{misplaced[0]} is not an estimator parameter; params.params holds "
            f"the estimator's own parameters, the estimate's fields go at the top level "
            f"(params.{misplaced[0]})")
    spec = {k: v for k, v in params.items()
            if k in fields and k not in _ESTIMATE_SERVER_FIELDS and k not in ("method", "params")}
    if isinstance(spec.get("kinds"), list):
        spec["kinds"] = tuple(spec["kinds"])
    return EstimateSpec(method=str(params.get("method", "datafree")), params=dict(inner), **spec)


def _job_spec(params: Mapping[str, Any]) -> Any:
    """The job's spec: the consumer's palette (``allocator.export.palettes``) as its options and,
    unless the job names one, the consumer's own quantizer (ggml for llamacpp), as ``bitalloc
    estimate --for`` does."""
    consumer = params.get("consumer")
    if consumer is not None:
        from allocator.export.palettes import palette_options
        from allocator.model.quant.quantizer import default_quantizer

        params = {"quantizer": default_quantizer(str(consumer)), **params,
                  "options": palette_options(str(consumer), params.get("options"))}
    return estimate_spec_of(params)


def _run_estimate(params: Mapping[str, Any], progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    try:
        import sensitivity
        from sensitivity import ESTIMATORS
    except ImportError as exc:
        raise JobFailure("estimator_unavailable",
                         f"the sensitivity package is not installed: {exc}") from None
    method = str(params.get("method", "datafree"))
    if method not in ESTIMATORS:
        raise JobFailure("unknown_name", f"unknown estimator {method!r}; choose one of {sorted(ESTIMATORS)}")
    consumer = params.get("consumer")
    try:
        spec = _job_spec(params)
    except InvalidParameterError as exc:
        raise JobFailure("invalid_parameter", f"bad estimate parameters: {exc}") from None
    progress(0.0, f"estimating {method} costs of {Path(str(params['model'])).name}")
    if cancel.is_set():
        raise JobCancelled
    try:
        from allocator.model.device import check_device

        check_device(spec.device, flag="params.device")  # on the worker that will run the model
    except InvalidParameterError as exc:
        raise JobFailure("invalid_parameter", str(exc)) from None
    try:
        table = sensitivity.estimate(str(params["model"]), spec)
    except ModuleNotFoundError as exc:  # e.g. the driver or torch not installed
        raise JobFailure("estimator_unavailable", f"estimation needs a missing module: {exc.name}") from None
    if consumer is not None:  # the consumer's ties, accounting and left-out units
        from allocator.export.palettes import table_for_model

        try:
            table = table_for_model(table, str(consumer), str(params["model"]))
        except InvalidParameterError as exc:
            raise JobFailure("invalid_parameter", f"consumer {consumer!r}: {exc}") from None
    if cancel.is_set():
        raise JobCancelled
    return {"table": table, "method": method, "name": params.get("name") or Path(str(params["model"])).name}


# ----------------------------------------------------------------- search
_SEARCH_KEYS = {"table_id", "budget", "n_trials", "seed", "radius", "prune"}


def _validate_search(params: Mapping[str, Any], roots: list[Path]) -> dict[str, Any]:
    from allocator.core.budget import Budget

    unknown = set(params) - _SEARCH_KEYS
    if unknown:
        raise ServiceError(422, "invalid_parameter",
                           f"unknown search parameter(s) {sorted(unknown)}; known: {sorted(_SEARCH_KEYS)}")
    if not isinstance(params.get("table_id"), str):
        raise ServiceError(422, "invalid_parameter", "params.table_id (a stored table id) is required")
    if not isinstance(params.get("budget"), Mapping):
        raise ServiceError(422, "invalid_parameter", "params.budget (e.g. {\"bpw\": 3.0}) is required")
    Budget.from_dict(params["budget"])  # invalid budgets fail at submission, not in the worker
    n = params.get("n_trials", 50)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
        raise ServiceError(422, "invalid_parameter",
                           f"params.n_trials must be an int in 1..100000, got {n!r}")
    return dict(params)


class _CountingEvaluator:
    """The table's additive cost, counting calls for progress and checking the cancel flag."""

    def __init__(self, table: Any, n_trials: int, progress: Progress, cancel: threading.Event) -> None:
        df = table.df
        self._cost = dict(zip(zip(df["unit"], df["option"], strict=True), df["cost"], strict=True))
        self._n, self._done = n_trials, 0
        self._progress, self._cancel = progress, cancel

    def __call__(self, choice: Mapping[str, str]) -> float:
        if self._cancel.is_set():
            raise JobCancelled
        self._done += 1
        self._progress(min(self._done / self._n, 0.99), f"trial {self._done}/{self._n}")
        return float(sum(self._cost[(u, o)] for u, o in choice.items()))


def _run_search(params: Mapping[str, Any], progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    from allocator.core.budget import Budget

    try:
        import solvers

        cls = solvers.solver_class("bayesian")
    except ImportError as exc:
        raise JobFailure("search_unavailable", f"the search solver cannot be imported: {exc}") from None
    if not cls.is_available():
        raise JobFailure("search_unavailable", "the search needs optuna: pip install 'bitalloc[search]'")
    table = params["table"]
    n_trials = int(params.get("n_trials", 50))
    evaluator = _CountingEvaluator(table, n_trials, progress, cancel)
    solver = cls(evaluator=evaluator, n_trials=n_trials, radius=int(params.get("radius", 1)),  # type: ignore[call-arg]
                 prune=bool(params.get("prune", True)))
    result = solver.solve(table, Budget.from_dict(params["budget"]), seed=params.get("seed"))
    return {"plan": result, "status": str(result.status), "objective": result.objective}


register_job_kind(JobKind("estimate", _run_estimate, _validate_estimate))
register_job_kind(JobKind("search", _run_search, _validate_search, needs_table=True))
register_job_kind(RUN_KIND)  # ``bitalloc run`` on the service (allocator.service.run_job)
