"""The end-to-end job behind ``bitalloc run`` and ``bitalloc demo``.

model → calibration batches (built-in corpus, ``calibration`` split, or the user's ``data``
file) → units (``include``/``exclude`` globs; units that cannot affect the output left out) →
cost table (estimator) → frontier + exact solve at the target bpw → apply (RTN or GPTQ) → verify
→ evaluate on held-out data (the ``evaluation`` split, ``eval_data``, or the held-out share of
``data``; see :mod:`allocator.model.data.user`) against the full-precision outputs.

The mixed plan is compared with uniform quantization at equal size: the uniform int option with
the most bits whose size fits the mixed plan's budget (``uniform ≤``), and the uniform option
that brackets the budget from above (``uniform >``, larger than the budget) for context.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.budget import Budget
from allocator.core.errors import InfeasibleBudgetError, InvalidParameterError
from allocator.core.formats import parse_format
from allocator.core.plan import BitPlan
from allocator.core.table import CostTable
from allocator.jobs.applied import APPLIED_CHECK_METHODS, AppliedChoice
from allocator.jobs.refine import RefineConfig, RefineResult
from allocator.jobs.report import plan_label, write_outputs
from allocator.jobs.stages import StageWriter, check_saved_table, expected_provenance
from allocator.model.data.split import DEFAULT_VALIDATION_SHARE
from allocator.model.kind import ModelKind

if TYPE_CHECKING:
    import torch

    from allocator.backend import Comparison, EvalReport, Interval
    from allocator.model.data.split import SampleSplit
    from allocator.model.quant import Quantizer
    from sensitivity import EstimateSpec

__all__ = ["DEFAULT_RUN_BATCH_SIZE", "DEFAULT_RUN_ESTIMATOR", "PlanResult", "RunConfig", "RunResult",
           "run_candidates", "run_pipeline", "run_quantizer", "run_spec", "select_plan", "uniform_plans"]

log = logging.getLogger(__name__)


#: texts per calibration batch of ``run`` / ``demo`` (``bitalloc estimate`` takes
#: ``sensitivity._spec.DEFAULT_BATCH_SIZE``): the run's batches also feed GPTQ and the refinement,
#: and its results were measured with this size
DEFAULT_RUN_BATCH_SIZE = 16
DEFAULT_RUN_ESTIMATOR = "gauss-newton"


def run_spec(method: str = DEFAULT_RUN_ESTIMATOR, **fields: Any) -> EstimateSpec:
    """The :class:`~sensitivity.EstimateSpec` of a run: ``fields`` as given, the batch size
    :data:`DEFAULT_RUN_BATCH_SIZE` unless set. ``options`` None is the dense palette (unless
    the run has a consumer); ``data`` is the user's text file, split into calibration and
    held-out shares when there is no ``eval_data`` (:mod:`allocator.model.data.user`)."""
    from sensitivity import EstimateSpec

    return EstimateSpec(method=method, **{"batch_size": DEFAULT_RUN_BATCH_SIZE, **fields})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Settings of one end-to-end run; the CLI flags of ``bitalloc run`` map onto them (the
    estimate's onto :attr:`estimate`).

    ``estimate`` says what to estimate, as ``bitalloc estimate`` does (:func:`run_spec`: the
    estimator, its parameters, options, calibration size, data file, unit globs, groups, seed,
    progress); it runs on the whole model on the CPU, on the units the run selects (the globs,
    then units that cannot affect the output left out unless ``drop_inert`` is False).
    """

    model: str = "minilm"
    bpw: float = 3.0
    estimate: EstimateSpec = field(default_factory=run_spec)
    solver: str = "mckp"
    #: the plan's quantizer (rtn, gptq, ggml), in every stage; "auto": ggml for --for llamacpp,
    #: rtn otherwise
    method: str = "auto"
    #: export target whose options and ties the table takes (``allocator.export.palettes``); the
    #: plan then exports to it without --lossy, within the budget of its own accounting
    consumer: str | None = None
    eval_samples: int = 128
    #: operating-point refinement rounds on calibration data (0: only pick the best candidate)
    refine_rounds: int = 4
    refine_neighbours: int = 1
    #: seconds for the refinement rounds; the best measured plan so far is handed out (None: no limit)
    refine_time_limit: float | None = 300.0
    #: share of the calibration samples (by sample hash, :mod:`allocator.model.data.split`) held
    #: out of the estimate and of the move measurements to judge the candidates and every
    #: refinement move (0: no split, the calibration data judges itself)
    validation_share: float = DEFAULT_VALIDATION_SHARE
    out: Path | None = Path("bitalloc-demo")
    #: the user's held-out text file (None: the held-out share of ``estimate.data``, else the
    #: built-in corpus' evaluation split)
    eval_data: str | None = None
    #: leave units whose output cannot reach the measured output out of the budget
    drop_inert: bool = True
    #: start from this saved cost table instead of estimating (``run --table FILE``); it must
    #: be a table of this model and of the units the run selects
    #: (:func:`allocator.jobs.stages.check_saved_table`)
    table: Path | None = None
    #: reuse ``out/table.parquet`` when its provenance matches this run's model and estimate
    #: (refused in one line when it does not; estimated as usual when there is none)
    resume: bool = False

    @property
    def options(self) -> str | None:
        """The estimate's option spec (a string: checked in ``__post_init__``)."""
        options = self.estimate.options
        return options if isinstance(options, str) else None

    @property
    def candidate_options(self) -> str | None:
        """The estimate's ``options``, else the dense palette (unless a consumer fixes them)."""
        return self.options if self.options is not None or self.consumer else "dense"

    def __post_init__(self) -> None:
        from sensitivity import EstimateSpec

        if not isinstance(self.estimate, EstimateSpec):
            raise InvalidParameterError(f"estimate must be a sensitivity.EstimateSpec (run_spec(...)), "
                                        f"got {self.estimate!r}")
        if not self.bpw > 0:
            raise InvalidParameterError(f"bpw must be > 0, got {self.bpw!r}")
        from allocator.model.quant.quantizer import QUANTIZERS, default_quantizer

        if self.method == "auto":
            object.__setattr__(self, "method", default_quantizer(self.consumer))
        if self.method not in QUANTIZERS:
            raise InvalidParameterError(f"method {self.method!r} is unknown; choose auto, "
                                        f"{', '.join(QUANTIZERS)}")
        if self.estimate.quantizer not in ("rtn", self.method):
            # the run forms every ΔW with the quantizer it applies the plan with (``method``)
            raise InvalidParameterError(f"the estimate's quantizer {self.estimate.quantizer!r} is not the "
                                        f"run's method {self.method!r}; pass --method "
                                        f"{self.estimate.quantizer}")
        self._check_estimate()
        groups = self.estimate.groups
        if self.consumer is not None:
            from allocator.export.palettes import palette_options

            palette_options(self.consumer, self.options, groups)  # a consumer, no options/groups
        elif groups is not None:
            from allocator.core.formats import check_group_columns, parse_options

            check_group_columns(groups, parse_options(self.candidate_options))
        RefineConfig(rounds=self.refine_rounds, neighbours=self.refine_neighbours,  # validates
                     time_limit=self.refine_time_limit, validation_share=self.validation_share)
        v = self.eval_samples
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise InvalidParameterError(f"eval_samples must be an int ≥ 2, got {v!r}")
        if self.eval_data is not None and not isinstance(self.eval_data, str):
            raise InvalidParameterError(f"eval_data must be a file path, got {self.eval_data!r}")
        if self.table is not None:
            object.__setattr__(self, "table", Path(self.table))
            if not self.table.is_file():
                raise InvalidParameterError(f"--table {str(self.table)!r} does not exist; pass a "
                                            f"saved table.parquet (or drop --table)")
        if self.resume and (self.table is not None or self.out is None):
            raise InvalidParameterError("--resume reuses OUT/table.parquet: give --out and drop --table")

    def _check_estimate(self) -> None:
        """What a run's estimate cannot be: it needs the whole model here (it applies the plan)."""
        spec = self.estimate
        if spec.sequential or spec.sharding is not None:
            raise InvalidParameterError("a run estimates on the whole model in one process; drop "
                                        "sequential / sharding (estimate the table with `bitalloc "
                                        "estimate`, then `bitalloc run --table FILE`)")
        if spec.device != "cpu":
            raise InvalidParameterError(f"a run runs on the CPU, got device {spec.device!r}")
        if spec.units is not None:
            raise InvalidParameterError("a run selects its units itself: use include / exclude, "
                                        "not units")
        if spec.options is not None and not isinstance(spec.options, str):
            raise InvalidParameterError(f"a run's options are an option spec string such as "
                                        f"'int2..8-g128-asym,fp16', got {spec.options!r}")
        if spec.data is not None and not isinstance(spec.data, str):
            raise InvalidParameterError(f"data must be a file path, got {spec.data!r}")


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """One evaluated plan (mixed or uniform)."""

    label: str
    plan: BitPlan
    report: EvalReport
    verified: bool
    mismatches: Sequence[str] = ()

    @property
    def bpw(self) -> float:
        return self.plan.summary.bpw

    @property
    def size_bytes(self) -> float:
        return self.plan.summary.size_bits / 8


@dataclass(frozen=True, kw_only=True, eq=False)
class RunResult:
    config: RunConfig
    model_kind: str
    table: CostTable
    mixed: PlanResult
    uniform_below: PlanResult | None
    uniform_above: PlanResult | None
    seconds: Mapping[str, float]
    files: Mapping[str, Path] = field(default_factory=dict)
    fp_metrics: Mapping[str, float] = field(default_factory=dict)
    #: the plan handed out: the best measured candidate on calibration data, refined
    chosen: PlanResult | None = None
    selection: RefineResult | None = None
    #: the choice among the plans applied as the backend applies them (GPTQ; None: not needed)
    applied: AppliedChoice | None = None
    #: units left out of the budget → why (--include/--exclude, cannot affect the output)
    excluded: Mapping[str, str] = field(default_factory=dict)
    #: where calibration / held-out data came from, in words, and their batches' provenance
    data_info: Mapping[str, Any] = field(default_factory=dict)
    #: peak resident memory (MiB) of each stage of ``seconds`` (:mod:`allocator.core.rss`); where
    #: ``peak_rss_per_stage`` is False the platform cannot reset the mark and each value is the
    #: process's peak so far
    peak_rss_mb: Mapping[str, float] = field(default_factory=dict)
    peak_rss_per_stage: bool = True

    @property
    def result(self) -> PlanResult:
        """The plan handed out (``plan.json``)."""
        return self.chosen or self.mixed

    @property
    def rows(self) -> list[PlanResult]:
        rows = (self.uniform_below, self.mixed, self.chosen, self.uniform_above)
        return [r for r in rows if r is not None]

    @property
    def error_ratio(self) -> float | None:
        """Handed-out plan's held-out error / uniform-at-equal-size error (< 1: better)."""
        if self.uniform_below is None or self.uniform_below.report.error == 0:
            return None
        return self.result.report.error / self.uniform_below.report.error

    @property
    def worse_than_uniform(self) -> bool:
        """The handed-out plan measured worse than the uniform plan that fits, on held-out data."""
        below = self.uniform_below
        return below is not None and self.result.report.error > below.report.error

    def intervals(self, row: PlanResult) -> dict[str, Interval]:
        """Each held-out metric of ``row`` with its 95 % bootstrap interval over the evaluation
        samples (resamples seeded with the run's seed)."""
        return row.report.intervals(seed=self.config.estimate.seed)

    @cached_property
    def vs_uniform(self) -> dict[str, Comparison]:
        """The handed-out plan against the uniform plan that fits, per held-out metric: the
        paired 95 % interval of their ratio (lower is better) or difference (higher is better),
        both plans resampled on the same evaluation samples; empty without a uniform plan."""
        below = self.uniform_below
        if below is None:
            return {}
        return self.result.report.compare(below.report, seed=self.config.estimate.seed)

    @property
    def regressions(self) -> list[Comparison]:
        """The metrics (optimised or not) on which the handed-out plan is worse than the uniform
        plan that fits beyond the paired 95 % interval."""
        return [c for c in self.vs_uniform.values() if c.worse]


def uniform_plans(table: CostTable, budget_bits: float) -> tuple[BitPlan | None, BitPlan | None]:
    """(largest-bits uniform int plan with size ≤ budget, smallest uniform int plan above it).

    Only quantized options (int, GGUF) offered to every unit count (fp16 is not a quantized
    baseline).
    """
    df = table.df
    size: dict[str, float] = {}
    bits: dict[str, float] = {}
    units: dict[str, int] = {}
    for opt, sub in df.groupby("option"):
        o = str(opt)
        size[o], bits[o], units[o] = float(sub["size_bits"].sum()), float(sub["bits"].iloc[0]), \
            int(sub["unit"].nunique())
    cands = [o for o in size if units[o] == table.n_units and parse_format(o).is_quantized]
    fits = budget_bits * (1 + 1e-9)
    below = [o for o in cands if size[o] <= fits]
    above = [o for o in cands if size[o] > fits]
    pick_b = max(below, key=lambda o: (bits[o], size[o]), default=None)
    pick_a = min(above, key=lambda o: (size[o], -bits[o]), default=None)

    def plan(o: str | None) -> BitPlan | None:
        return None if o is None else BitPlan.from_choice(table, dict.fromkeys(table.units, str(o)))
    return plan(pick_b), plan(pick_a)


def run_candidates(table: CostTable, budget: Budget, optimum: BitPlan,
                   below: BitPlan | None) -> dict[str, BitPlan]:
    """The plans ``run`` measures before refining: the table's optimum and, when one fits, the
    uniform plan (``uniform ≤``)."""
    return {"table optimum": optimum, **({"uniform ≤": below} if below is not None else {})}


# ---------------------------------------------------------------------------- stages
Stage = Callable[[str], None]


def _load(spec: str) -> Any:
    from allocator.model.loading import load_model

    return load_model(spec)


def _data(loaded: Any, cfg: RunConfig) -> tuple[Any, Any]:
    from allocator.model.data import user_data_for
    from allocator.model.outputs import rows_within

    spec = cfg.estimate
    common: dict[str, Any] = {"seq_len": spec.seq_len, "batch_size": spec.batch_size,
                              "seed": spec.seed, "data": spec.data, "eval_data": cfg.eval_data}
    # evaluation runs batch by batch with the reference of the batch read back beside it: a
    # large vocabulary's logits get smaller batches (the metrics are sums per sample)
    rows = rows_within(loaded.model, str(loaded.kind), spec.seq_len, spec.batch_size)
    return (user_data_for(loaded, "calibration", spec.samples, **common),
            user_data_for(loaded, "evaluation", cfg.eval_samples, **{**common, "batch_size": rows}))


def _units(loaded: Any, cfg: RunConfig, calib: Any) -> Any:
    """The units in the budget (``UnitSelection``): the globs, then inert units left out."""
    from allocator.core.units import discover_units
    from allocator.model.unit_select import select_units

    spec = cfg.estimate
    batch = next(iter(calib)) if cfg.drop_inert else None
    found = discover_units(loaded.model, kinds=spec.kinds, group_columns=spec.groups)
    return select_units(loaded, found, include=spec.include or (), exclude=spec.exclude or (),
                        batch=batch)


def _data_info(cfg: RunConfig, calib: Any, evaluation: Any) -> dict[str, Any]:
    from allocator.model.data import data_description

    words = data_description(cfg.estimate.data, cfg.eval_data)
    return {"calibration": words["calibration"], "evaluation": words["evaluation"],
            "calibration_batches": calib.metadata(), "evaluation_batches": evaluation.metadata()}


def estimate_table(loaded: Any, calib: Any, cfg: RunConfig, units: Sequence[Any],
                   quantizer: Quantizer | None = None) -> CostTable:
    """The run's cost table: :func:`sensitivity.estimate` (the one driver, as ``bitalloc
    estimate``: seeded, same provenance keys) on the loaded model, the run's calibration batches
    and the units it selected, ΔW with the run's quantizer (``cfg.method``; built
    when None); then the consumer's palette and ties."""
    import dataclasses

    from allocator.export.palettes import palette_options
    from sensitivity import estimate

    spec = dataclasses.replace(cfg.estimate, data=calib, units=tuple(u.name for u in units),
                               options=palette_options(cfg.consumer, cfg.candidate_options),
                               quantizer=cfg.method)
    return _palette(estimate(loaded, spec, prebuilt_quantizer=quantizer), loaded, cfg, units)


def _palette(table: CostTable, loaded: Any, cfg: RunConfig, units: Sequence[Any]) -> CostTable:
    """``table`` in the consumer's palette, with its ties (unchanged without a consumer)."""
    if cfg.consumer is None:
        return table
    from allocator.core.units import discover_units
    from allocator.export.palettes import apply_palette

    # units tied (by the consumer) to a module left out of the budget are left out as well
    everything = [u.name for u in discover_units(loaded.model, fusion=None)]
    return apply_palette(table, cfg.consumer, shapes={u.name: u.shape for u in units},
                         model_names=everything)


def _evaluate_plan(label: str, plan: BitPlan, loaded: Any, cfg: RunConfig, state: Any,
                   calib: Any, evaluation: Any, ref: Any, units: Sequence[Any],
                   lap: Stage) -> PlanResult:
    from allocator.backend import apply_plan, evaluate, verify

    model: torch.nn.Module = loaded.model
    state.restore(model)
    apply_plan(model, plan, method=cfg.method, calibration=list(calib), units=units,
               progress=cfg.estimate.progress)
    check = verify(model, plan, units=units)
    lap("apply")
    report = evaluate(model, list(evaluation), ref)
    state.restore(model)
    lap("evaluate")
    return PlanResult(label=label, plan=plan, report=report, verified=check.ok,
                      mismatches=[str(m) for m in check.mismatches])


def run_pipeline(cfg: RunConfig, *, on_stage: Stage | None = None) -> RunResult:
    """Run every stage; writes plan.json, table.parquet, frontier.png, report.md into ``cfg.out``.

    Raises:
        InfeasibleBudgetError: no plan fits ``cfg.bpw`` (the message gives the smallest bpw).
    """
    import solvers
    from allocator.backend import reference_outputs
    from allocator.core.rss import StageMeter

    say = on_stage or (lambda msg: log.info("%s", msg))
    meter = StageMeter()  # seconds and peak RSS per stage, in results.json
    lap = meter.lap

    say(f"loading {cfg.model}")
    loaded = _load(cfg.model)
    loaded.model.eval()
    calib, evaluation = _data(loaded, cfg)
    shares = _shares(cfg, calib)
    # the table is estimated on the fit share: the candidates it yields are judged on the rest
    fit = calib if shares is None else shares.fit
    selection_units = _units(loaded, cfg, calib)
    units = list(selection_units.units)
    if selection_units.excluded:
        say(f"{len(selection_units.excluded)} unit(s) left out of the budget: " + ", ".join(
            f"{u} ({why})" for u, why in list(selection_units.excluded.items())[:5])
            + (" …" if len(selection_units.excluded) > 5 else ""))
    quantizer = run_quantizer(loaded, cfg, fit, units, say)
    lap("load")
    write = StageWriter(cfg.out, cfg)
    table = _saved_table(cfg, loaded, fit, units, say)
    if table is None:
        held = "" if shares is None else f", {shares.n_validation} more held out for validation"
        say(f"estimating costs ({cfg.estimate.method}, {len(units)} units, {fit.n_samples} "
            f"samples{held})")
        table = estimate_table(loaded, fit, cfg, units, quantizer)
    lap("estimate")
    write.table(table)
    write.progress("estimate", meter)
    budget = Budget(bpw=cfg.bpw)
    say(f"solving at {cfg.bpw:g} bpw ({cfg.solver}) and computing the frontier")
    result = solvers.solve(table, budget, solver=cfg.solver, seed=cfg.estimate.seed)
    if result.plan is None:
        raise InfeasibleBudgetError(
            f"no plan fits {cfg.bpw:g} bpw (status {result.status}); raise --bpw "
            f"(the smallest option set needs {_min_bpw(table):.4g} bpw)")
    front = solvers.frontier(table, budgets=[budget])
    lap("solve")
    write.frontier(front)
    write.progress("solve", meter)
    below, above = uniform_plans(table, budget.size_cap_bits(table.total_params))
    cands = run_candidates(table, budget, result.plan, below)
    from allocator.model.output_store import TensorStash

    # the full-precision weights, restored after each plan: on disk, not a second model in memory
    state = TensorStash(loaded.model.state_dict())
    selection, applied, handed = select_plan(loaded, cfg, cands, table, budget,
                                             calib if shares is None else shares, units, quantizer,
                                             state, say, lap)
    write.candidates(selection, applied)
    write.plan(handed)
    write.progress("refine", meter)
    ref = reference_outputs(loaded.model, list(evaluation), kind=loaded.kind,
                            model_fingerprint=loaded.fingerprint)
    fp_metrics = _fp_metrics(ref, evaluation)
    lap("evaluate")
    say(f"applying ({cfg.method}) and evaluating on {evaluation.n_samples} held-out samples")
    args = (loaded, cfg, state, calib, evaluation, ref, units, lap)
    mixed = _evaluate_plan("mixed", result.plan, *args)
    ub = _evaluate_plan("uniform ≤", below, *args) if below is not None else None
    ua = _evaluate_plan("uniform >", above, *args) if above is not None else None
    chosen = _chosen(handed, selection.start_label if applied is None else applied.chosen,
                     mixed, ub, args)
    run = RunResult(config=cfg, model_kind=loaded.kind, table=table, mixed=mixed,
                    uniform_below=ub, uniform_above=ua, seconds=meter.seconds, fp_metrics=fp_metrics,
                    chosen=chosen, selection=selection, applied=applied,
                    excluded=dict(selection_units.excluded),
                    data_info={**_data_info(cfg, calib, evaluation), **_split_info(shares),
                               **_quantizer_info(quantizer)},
                    peak_rss_mb=meter.peaks,
                    peak_rss_per_stage=meter.per_stage)
    if run.worse_than_uniform:
        log.warning("the chosen plan measured worse than uniform %s on held-out data (%.4g vs %.4g)",
                    plan_label(run.uniform_below.plan) if run.uniform_below else "",
                    run.result.report.error, run.uniform_below.report.error if run.uniform_below else 0)
    for c in run.regressions:
        log.warning("the chosen plan is worse than the uniform plan that fits on %s beyond the 95 %% "
                    "interval: %s vs %s", c.metric, c.a.text(), c.b.text())
    if cfg.out is not None:
        run = write_outputs(run, front, cfg.out, files=write.files)
    return run


def run_quantizer(loaded: Any, cfg: RunConfig, fit: Any, units: Sequence[Any],
                  say: Callable[[str], None] | None = None) -> Quantizer:
    """The plan's quantizer (``cfg.method``), shared by the estimate, the candidate choice and
    refinement, fitted on the fit share (the validation share judges what it gives).

    GPTQ takes its input Hessians from the uniform plan that fits as the backend applies it
    (:func:`~allocator.backend.gptq_quantizer_as_applied`): then every plan is measured
    against the uniform plan users would otherwise run, not a per-unit stand-in of it; with no
    uniform plan under the budget, from the full-precision model."""
    from allocator.backend import gptq_quantizer_as_applied
    from allocator.model.quant import build_quantizer

    say = say or (lambda msg: log.info("%s", msg))
    if cfg.method == "gptq":
        below, _ = uniform_plans(*_sizes_only(loaded, cfg, units))
        if below is not None:
            say(f"collecting GPTQ input Hessians as {plan_label(below)} is applied "
                f"({fit.n_samples} samples, {len(units)} units)")
            return gptq_quantizer_as_applied(loaded.model, units, list(fit), below)
    if cfg.method != "rtn":
        say(f"collecting {cfg.method} input statistics ({fit.n_samples} samples, {len(units)} units)")
    return build_quantizer(cfg.method, loaded.model, units, list(fit), kind=str(loaded.kind))


def _quantizer_info(quantizer: Quantizer) -> dict[str, Any]:
    """Where a data-fitted quantizer's statistics come from (results.json ``data``)."""
    inputs = getattr(quantizer, "inputs", None)
    return {"quantizer_inputs": inputs} if isinstance(inputs, str) else {}


def _sizes_only(loaded: Any, cfg: RunConfig, units: Sequence[Any]) -> tuple[CostTable, float]:
    """A table of the run's units and options with sizes and no costs (before any estimate),
    and the budget in bits: enough for :func:`uniform_plans`."""
    import numpy as np

    from allocator.core.formats import parse_options
    from allocator.export.palettes import palette_options

    opts = parse_options(palette_options(cfg.consumer, cfg.candidate_options))
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=opts, cost=np.zeros((len(units), len(opts))),
                                      in_features=[u.in_features for u in units])
    table = _palette(table, loaded, cfg, units)
    return table, Budget(bpw=cfg.bpw).size_cap_bits(table.total_params)


def _saved_table(cfg: RunConfig, loaded: Any, calib: Any, units: Sequence[Any],
                 say: Stage) -> CostTable | None:
    """The table of ``--table`` / ``--resume`` once it is checked against this run, else None."""
    from allocator.export.palettes import palette_options

    path = cfg.table if cfg.table is not None else (
        cfg.out / "table.parquet" if cfg.resume and cfg.out is not None else None)
    if path is None or not path.is_file():
        return None
    table = CostTable.load(path)
    options = [f.name for f in dataclasses.replace(
        cfg.estimate, options=palette_options(cfg.consumer, cfg.candidate_options)).formats()]
    expected = expected_provenance(cfg, model_fingerprint=loaded.fingerprint,
                                   data_fingerprint=calib.fingerprint, options=options)
    check_saved_table(table, path, units=[u.name for u in units], expected=expected,
                      strict=cfg.table is None)
    say(f"using the saved table {path} ({table.n_units} units × {len(table.options)} options; "
        f"no estimate)")
    return table


def _shares(cfg: RunConfig, calib: Any) -> SampleSplit | None:
    """The calibration data's fit and validation shares (None: ``validation_share`` 0)."""
    from allocator.model.data.split import split_calibration

    return None if cfg.validation_share == 0 else split_calibration(calib, cfg.validation_share)


def _split_info(shares: SampleSplit | None) -> dict[str, Any]:
    """The ``data`` entries of results.json that record the split."""
    if shares is None:
        return {"validation_split": None}
    return {"validation_split": {**shares.metadata(), "estimate": "fit share",
                                 "fit_batches": shares.fit.metadata(),
                                 "validation_batches": shares.validation.metadata()}}


def select_plan(loaded: Any, cfg: RunConfig, cands: Mapping[str, BitPlan], table: CostTable,
                budget: Budget, data: Any, units: Sequence[Any], quantizer: Quantizer, state: Any,
                say: Stage, lap: Stage | None = None) -> tuple[RefineResult, AppliedChoice | None, BitPlan]:
    """The plan ``run`` hands out: the candidates measured and refined with the per-unit
    ``quantizer`` (:func:`~allocator.jobs.refine.refine_plan`), then, for a method the backend
    applies otherwise (:data:`~allocator.jobs.applied.APPLIED_CHECK_METHODS`: GPTQ), the choice
    among the refined plan and the candidates as the backend applies them
    (:func:`~allocator.jobs.applied.applied_choice`). ``data`` is a :class:`SampleSplit` or the
    calibration batches; ``state`` (a :class:`~allocator.model.output_store.TensorStash`) restores
    the full-precision weights. Returns (refinement, applied choice or None, handed-out plan)."""
    from allocator.model.data.split import SampleSplit

    judged = "calibration data" if not isinstance(data, SampleSplit) else \
        f"moves measured on {data.n_fit} samples, judged on {data.n_validation} validation samples"
    say(f"choosing among {len(cands)} measured candidates and refining at the plan "
        f"({cfg.refine_rounds} rounds, {judged})")
    selection = _select(loaded, cfg, cands, table, budget, data, units, quantizer)
    if lap is not None:
        lap("refine")
    if cfg.method not in APPLIED_CHECK_METHODS:
        return selection, None, selection.plan
    plans = {"refined": selection.plan, **cands}
    applied = _applied(loaded, cfg, plans, data, units, state, say, quantizer)
    if lap is not None:
        lap("applied choice")
    return selection, applied, plans[applied.chosen]


def _select(loaded: Any, cfg: RunConfig, cands: Mapping[str, BitPlan], table: CostTable,
            budget: Budget, data: Any, units: Sequence[Any], quantizer: Quantizer) -> RefineResult:
    """Measure the candidates and refine (:func:`~allocator.jobs.refine.refine_plan`): moves on
    the fit share, judged on the validation share of ``data`` (a :class:`SampleSplit`), or on
    ``data`` itself (calibration batches) when there is no split."""
    from allocator.jobs.refine import refine_plan
    from allocator.model.data.split import SampleSplit

    conf = RefineConfig(rounds=cfg.refine_rounds, neighbours=cfg.refine_neighbours,
                        time_limit=cfg.refine_time_limit, validation_share=cfg.validation_share)
    fit, validation = (data.fit, data.validation) if isinstance(data, SampleSplit) else (data, None)
    res = refine_plan(loaded.model, cands, table, budget, list(fit), units, kind=loaded.kind,
                      config=conf, quantizer=quantizer,
                      validation=None if validation is None else list(validation))
    if isinstance(data, SampleSplit):  # the split's own record, not only its fingerprints
        res = dataclasses.replace(res, validation=data.metadata())
    return res


def _chosen(plan: BitPlan, origin: str, mixed: PlanResult, below: PlanResult | None,
            args: tuple[Any, ...]) -> PlanResult:
    """The held-out result of the handed-out ``plan`` (re-using an evaluation already done);
    ``origin`` names where it came from when it is a new plan (the refinement's start)."""
    for done in (mixed, below):
        if done is not None and done.plan.choice == plan.choice:
            label = f"chosen = {done.label}"
            return PlanResult(label=label, plan=done.plan, report=done.report,
                              verified=done.verified, mismatches=done.mismatches)
    origin = origin if origin != "refined" else "the refinement"
    return _evaluate_plan(f"chosen (refined from {origin})", plan, *args)


def _applied(loaded: Any, cfg: RunConfig, plans: Mapping[str, BitPlan], data: Any,
             units: Sequence[Any], state: Any, say: Stage, quantizer: Quantizer) -> AppliedChoice:
    """:func:`~allocator.jobs.applied.applied_choice` on the fit / validation shares of ``data``
    (a :class:`SampleSplit`; calibration batches judge themselves without one), the validation
    batches cut so that their outputs stay within the output chunk budget."""
    from allocator.jobs.applied import applied_choice
    from allocator.model.data.split import SampleSplit
    from allocator.model.outputs import tokens_within
    from sensitivity import make_chunks

    fit, validation = (data.fit, data.validation) if isinstance(data, SampleSplit) else (data, data)
    pieces = [c.batch for c in make_chunks(list(validation), max_tokens=tokens_within(
        loaded.model, str(loaded.kind), cfg.estimate.seq_len * cfg.estimate.batch_size))]
    say(f"choosing among the plans as {cfg.method} applies them (block by block), judged on "
        f"{validation.n_samples} validation samples")
    return applied_choice(loaded.model, plans, kind=str(loaded.kind), method=cfg.method,
                          fit=list(fit), validation=pieces, units=units,
                          restore=lambda: state.restore(loaded.model), uniform="uniform ≤",
                          seed=cfg.estimate.seed, say=say, quantizer=quantizer)


def _min_bpw(table: CostTable) -> float:
    df = table.df
    return float(df.groupby("unit")["size_bits"].min().sum() / table.total_params)


def _fp_metrics(ref: Any, evaluation: Any) -> dict[str, float]:
    """Metrics of the full-precision model itself (perplexity for causal LMs)."""
    if ref.kind != ModelKind.CAUSAL_LM:
        return {}
    import math

    from allocator.backend import next_token_nll

    s = n = 0.0
    for b, out in zip(evaluation, ref.outputs, strict=True):
        a, c = next_token_nll(out, b["input_ids"], b.get("attention_mask"))
        s, n = s + a, n + c
    return {"perplexity": math.exp(s / max(n, 1))}


# ---------------------------------------------------------------------------- outputs
