"""The ``run`` job kind: ``bitalloc run`` on the service (issue 9).

The job runs :func:`allocator.jobs.pipeline.run_pipeline` on a model under a model root: it
estimates the cost table, solves at ``bpw``, measures the candidates (the table optimum and the
uniform plan that fits) on calibration data, refines the best one, and evaluates every plan on
held-out data. The worker stores the table (``table_id``) and the plan handed out (``plan_id``);
the rest of the result mirrors ``results.json`` of ``bitalloc run``. A handed-out plan that
measured worse than uniform on held-out data carries a ``warning``, so it is never silent.

Registered by :mod:`allocator.service.job_kinds` with ``estimate`` and ``search``, so the kind
exists wherever they do.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from allocator.core.errors import InvalidParameterError, UnknownNameError
from allocator.service.data_param import refuse_nested_data, service_data
from allocator.service.infra.errors import ServiceError
from allocator.service.job_registry import JobCancelled, JobFailure, JobKind, Progress
from allocator.service.model_roots import resolve_model_path

__all__ = ["RUN_KEYS", "RUN_KIND", "run_config_of"]

RUN_KEYS = frozenset({"model", "bpw", "estimator", "estimator_params", "options", "consumer",
                      "calib_samples", "eval_samples", "seq_len", "seed", "refine_rounds",
                      "refine_time_limit", "validation_share", "include", "exclude", "data",
                      "name"})

#: (params key, smallest value) of the integer parameters; the defaults are RunConfig's
_INTS = (("calib_samples", 1), ("eval_samples", 2), ("seq_len", 2), ("seed", 0), ("refine_rounds", 0))

#: how far through the job each pipeline stage starts (by the first word of its message); the
#: estimate and the measured selection/evaluation dominate, loading and solving are quick
_STAGE_AT = {"loading": 0.02, "estimating": 0.1, "solving": 0.45, "choosing": 0.5, "applying": 0.75}


def _bad(message: str) -> ServiceError:
    return ServiceError(422, "invalid_parameter", message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _patterns(value: Any, key: str) -> list[str]:
    from allocator.model.unit_select import check_patterns

    try:  # the globs of `bitalloc run`; a malformed one fails at submission
        return list(check_patterns(value, f"params.{key}") or ())
    except InvalidParameterError as exc:
        raise _bad(str(exc)) from None


def _options(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(o, str) for o in value):
        return ",".join(value)
    raise _bad(f"params.options must be an option spec string or a list of option labels, "
               f"got {value!r}")


def _validate_run(params: Mapping[str, Any], roots: list[Path]) -> dict[str, Any]:
    """Checks every parameter before the job is queued; returns them normalised.

    Runs again on the worker (roots and files may have changed), so the output must stay a
    valid input: paths resolved, patterns as lists, a ``budget`` the worker stores the plan under.
    """
    unknown = set(params) - RUN_KEYS
    if unknown:
        raise _bad(f"unknown run parameter(s) {sorted(unknown)}; known: {sorted(RUN_KEYS)}")
    out = dict(params)
    out["model"] = str(resolve_model_path(params.get("model"), roots))
    bpw: Any = params.get("bpw")
    if not _is_number(bpw) or bpw <= 0:
        raise _bad(f"params.bpw must be a number > 0 (the bits-per-weight budget), got {bpw!r}")
    for key, low in _INTS:
        v: Any = params.get(key)
        if v is not None and (not _is_int(v) or v < low):
            raise _bad(f"params.{key} must be an int ≥ {low}, got {v!r}")
    limit: Any = params.get("refine_time_limit")
    if limit is not None and (not _is_number(limit) or limit <= 0):
        raise _bad(f"params.refine_time_limit must be seconds > 0 (or null for no limit), "
                   f"got {limit!r}")
    share: Any = params.get("validation_share")
    if share is not None and not _is_number(share):
        raise _bad(f"params.validation_share must be a number in [0, 0.5] (0: no validation "
                   f"share), got {share!r}")
    estimator = params.get("estimator", "gauss-newton")
    if not isinstance(estimator, str) or not estimator:
        raise _bad(f"params.estimator must be an estimator name, got {estimator!r}")
    est_params = params.get("estimator_params", {})
    if not isinstance(est_params, Mapping):
        raise _bad(f"params.estimator_params must be an object, got {est_params!r}")
    consumer = params.get("consumer")
    if consumer is not None and not isinstance(consumer, str):
        raise _bad(f"params.consumer must be an export target name, got {consumer!r}")
    if "options" in params:
        out["options"] = _options(params["options"])
    for key in ("include", "exclude"):
        if key in params:
            out[key] = _patterns(params[key], key)
    refuse_nested_data(params)  # the calibration text: inline, or a file under a model root
    if "data" in params:
        out["data"] = service_data(params["data"], roots)
    try:  # RunConfig and its estimate spec check the rest (consumer vs options, estimator names)
        run_config_of(out, data=None)
    except (InvalidParameterError, UnknownNameError) as exc:
        raise _bad(f"bad run parameters: {exc}") from None
    out["budget"] = {"bpw": float(bpw)}
    return out


def run_config_of(params: Mapping[str, Any], *, data: str | None) -> Any:
    """The :class:`~allocator.jobs.pipeline.RunConfig` of validated ``run`` job params.

    ``data`` is the calibration file the pipeline reads (inline texts are written to one first).
    """
    from allocator.jobs.pipeline import DEFAULT_RUN_ESTIMATOR, RunConfig, run_spec

    # the job's keys keep their names (calib_samples, estimator, ...): they map onto the spec
    spec_keys = {"calib_samples": "samples", "seq_len": "seq_len", "seed": "seed"}
    fields: dict[str, Any] = {new: params[old] for old, new in spec_keys.items()
                              if params.get(old) is not None}
    kw: dict[str, Any] = {k: params[k] for k in ("eval_samples", "refine_rounds", "validation_share")
                          if params.get(k) is not None}
    if "refine_time_limit" in params:
        kw["refine_time_limit"] = params["refine_time_limit"]
    spec = run_spec(str(params.get("estimator", DEFAULT_RUN_ESTIMATOR)),
                    params=dict(params.get("estimator_params") or {}), options=params.get("options"),
                    include=tuple(params.get("include") or ()),
                    exclude=tuple(params.get("exclude") or ()), data=data, progress=False, **fields)
    return RunConfig(model=str(params["model"]), bpw=float(params["bpw"]), estimate=spec,
                     consumer=params.get("consumer"), out=None, **kw)


def _write_texts(texts: list[str], folder: str) -> str:
    """Inline texts as a ``.jsonl`` file (one ``{"text"}`` a line keeps newlines inside a text)."""
    path = Path(folder) / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _run_run(params: Mapping[str, Any], progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    from allocator.core.result import SolveResult, SolveStatus

    try:
        from allocator.jobs.pipeline import run_pipeline
    except ImportError as exc:
        raise JobFailure("estimator_unavailable", f"the run pipeline cannot be imported: {exc}") from None
    at = [0.0]

    def on_stage(message: str) -> None:
        # the pipeline's stages are the only safe points to stop: between them nothing is half-done
        if cancel.is_set():
            raise JobCancelled
        word = message.split(" ", 1)[0]
        at[0] = _STAGE_AT.get(word, at[0])
        progress(at[0], message)

    with tempfile.TemporaryDirectory(prefix="bitalloc-run-") as tmp:
        data = params.get("data")
        path = _write_texts(list(data), tmp) if isinstance(data, list) else data
        try:
            cfg = run_config_of(params, data=path)
        except (InvalidParameterError, UnknownNameError) as exc:
            raise JobFailure("invalid_parameter", f"bad run parameters: {exc}") from None
        try:
            run = run_pipeline(cfg, on_stage=on_stage)
        except ModuleNotFoundError as exc:  # torch / transformers not installed on this worker
            raise JobFailure("estimator_unavailable", f"the run needs a missing module: {exc.name}") from None
    if cancel.is_set():
        raise JobCancelled
    plan = run.result.plan
    name = plan.solver.name or f"{cfg.solver}+refine"
    handed = SolveResult(status=SolveStatus.FEASIBLE, solver=name, plan=plan,
                         objective=plan.summary.predicted_cost,
                         message=f"chosen on calibration data: {run.result.label}")
    from allocator.jobs.report import regression_warnings, run_summary

    summary = run_summary(run)
    if isinstance(data, list):  # not the temporary file's path, which is gone
        summary["config"]["data"] = f"{len(data)} inline texts"
    # the table first: the worker stores the plan under the table stored just before it
    out: dict[str, Any] = {"table": run.table, "plan": handed,
                           "name": params.get("name") or Path(str(params["model"])).name, **summary}
    warnings = []
    if run.worse_than_uniform and run.uniform_below is not None:
        warnings.append(f"the handed-out plan ({run.result.label}) measured worse than the uniform "
                        f"plan that fits on held-out data ({run.result.report.error:.4g} vs "
                        f"{run.uniform_below.report.error:.4g}); consider the uniform plan or "
                        f"more calibration samples")
    # a metric the plan was not chosen on may be worse beyond its interval: never silent either
    warnings += regression_warnings(run)
    if warnings:
        out["warning"] = " ".join(warnings)
    progress(1.0, f"done: {run.result.label}")
    return out


#: registered with the other built-in kinds by :mod:`allocator.service.job_kinds`
RUN_KIND = JobKind("run", _run_run, _validate_run)
