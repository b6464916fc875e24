"""A run that survives: each stage's output written as soon as it exists, and a saved table reused.

``bitalloc run`` writes into its output folder while it goes (:class:`StageWriter`):
``table.parquet`` right after the estimate, ``frontier.json`` after the solve (the predicted
Pareto points), ``candidates.json`` and ``plan.json`` after the measured selection and
refinement, and ``results.json`` after every stage (``stage``: the last one finished; the full
summary at the end). A run killed in a later stage keeps what the earlier ones produced; every file
is replaced atomically (:mod:`allocator.core.atomic`), so none is ever half-written.

``run --table FILE`` starts from a saved table and skips the estimate; ``run --resume`` takes
``OUT/table.parquet`` when its provenance matches this run's model and estimate
(:func:`check_saved_table`) and refuses it in one line otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.atomic import atomic_write_text
from allocator.core.errors import InvalidParameterError

if TYPE_CHECKING:
    from allocator.core.plan import BitPlan
    from allocator.core.rss import StageMeter
    from allocator.core.table import CostTable
    from allocator.jobs.applied import AppliedChoice
    from allocator.jobs.pipeline import RunConfig
    from allocator.jobs.refine import RefineResult

__all__ = ["StageWriter", "check_saved_table", "config_summary", "expected_provenance"]


def config_summary(cfg: RunConfig) -> dict[str, Any]:
    """The run's settings as ``results.json`` has always recorded them (flat keys: ``estimator``,
    ``calib_samples``, ...), the estimate's fields included."""
    spec = cfg.estimate
    return {"model": cfg.model, "bpw": cfg.bpw, "estimator": spec.method,
            "estimator_params": dict(spec.params), "solver": cfg.solver, "method": cfg.method,
            "options": spec.options if spec.options is None or isinstance(spec.options, str)
            else [str(o) for o in spec.options],
            "consumer": cfg.consumer, "calib_samples": spec.samples, "eval_samples": cfg.eval_samples,
            "seq_len": spec.seq_len, "batch_size": spec.batch_size, "seed": spec.seed,
            "refine_rounds": cfg.refine_rounds, "refine_neighbours": cfg.refine_neighbours,
            "refine_time_limit": cfg.refine_time_limit, "validation_share": cfg.validation_share,
            "out": str(cfg.out) if cfg.out is not None else None, "data": spec.data,
            "eval_data": cfg.eval_data, "include": list(spec.include or ()),
            "exclude": list(spec.exclude or ()), "drop_inert": cfg.drop_inert, "groups": spec.groups,
            "table": str(cfg.table) if cfg.table is not None else None}


class StageWriter:
    """Writes each stage's output into ``out`` as soon as it exists (None: writes nothing)."""

    def __init__(self, out: Path | str | None, cfg: RunConfig) -> None:
        self.dir = Path(out) if out is not None else None
        self.cfg = cfg
        self.files: dict[str, Path] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _json(self, key: str, name: str, doc: Any) -> None:
        if self.dir is None:
            return
        path = self.dir / name
        atomic_write_text(path, json.dumps(doc, indent=1, default=str))
        self.files[key] = path

    def progress(self, stage: str, meter: StageMeter) -> None:
        """``results.json`` so far: the settings, the stages finished, their seconds and peak RSS."""
        self._json("results", "results.json", {"stage": stage, "complete": False,
                                               "config": config_summary(self.cfg),
                                               "seconds": dict(meter.seconds),
                                               "peak_rss_mb": dict(meter.peaks)})

    def table(self, table: CostTable) -> None:
        if self.dir is not None:
            self.files["table"] = table.save(self.dir / "table.parquet")

    def frontier(self, front: Any) -> None:
        """The predicted Pareto points (``frontier.png`` plots them with the measured plans)."""
        points = [{"bpw": float(b), "cost": float(c)} for b, c in zip(front.bpw, front.cost, strict=True)]
        self._json("frontier_points", "frontier.json", {"bpw": self.cfg.bpw, "points": points})

    def candidates(self, selection: RefineResult, applied: AppliedChoice | None = None) -> None:
        """The measured selection and refinement, and the choice among the plans as the backend
        applies them when one was made (``applied_choice``)."""
        self._json("candidates", "candidates.json", {
            **selection.to_dict(), "applied_choice": None if applied is None else applied.to_dict()})

    def plan(self, plan: BitPlan) -> None:
        if self.dir is not None:
            self.files["plan"] = plan.save(self.dir / "plan.json")


def expected_provenance(cfg: RunConfig, *, model_fingerprint: str, data_fingerprint: str | None,
                        options: Sequence[str]) -> dict[str, Any]:
    """What a table estimated by this run would record (the keys :func:`check_saved_table`
    compares for ``--resume``)."""
    spec = cfg.estimate
    return {"model_fingerprint": model_fingerprint, "estimator": spec.method,
            "estimator_params": spec.estimator().params(), "seed": spec.seed,
            "data_fingerprint": data_fingerprint if spec.estimator().needs_data else None,
            "options": sorted(options), "consumer": cfg.consumer, "quantizer": cfg.method}


def check_saved_table(table: CostTable, path: Path, *, units: Sequence[str],
                      expected: Mapping[str, Any], strict: bool) -> None:
    """Refuse (one line) a saved table this run cannot start from.

    Always: another model (``model_fingerprint``), or units the run does not put in the budget
    (or that it puts there and the table lacks, unless the consumer left them out). ``strict``
    (``--resume``): also another estimator, estimator parameters, seed, calibration data, options
    or consumer than this run would estimate with.
    """
    meta = table.metadata
    # tables from before the quantizer was recorded were all formed with RTN
    got = {**{k: meta.get(k) for k in expected}, "quantizer": meta.get("quantizer", "rtn"),
           "options": sorted(str(o) for o in table.options)}
    keys = list(expected) if strict else ["model_fingerprint"]
    for key in keys:
        if _norm(got[key]) != _norm(expected[key]):
            fix = "drop --resume to estimate again" if strict else "pass a table of this model"
            raise InvalidParameterError(
                f"saved table {str(path)!r} does not match this run: {key} is "
                f"{_short(got[key])}, this run's is {_short(expected[key])}; {fix}")
    dropped = set(meta.get("consumer_dropped") or {})
    extra = sorted(set(table.units) - set(units))
    missing = sorted(set(units) - set(table.units) - dropped)
    if extra or missing:
        what = (f"holds unit {extra[0]!r} the run leaves out of the budget" if extra
                else f"lacks unit {missing[0]!r} the run puts in the budget")
        raise InvalidParameterError(f"saved table {str(path)!r} {what}; use the same --include / "
                                    f"--exclude / --groups / --keep-inert it was estimated with")


def _norm(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = _norm(value)
    return text if len(text) <= 60 else text[:57] + "..."
