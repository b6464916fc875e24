"""What a run leaves behind: ``plan.json``, ``table.parquet``, ``frontier.png``, ``results.json``
(:func:`run_summary`, also the service run job's result), ``report.md`` and, when the handed-out
plan is worse than the uniform plan that fits on some held-out metric, ``plan-uniform.json``.

Every held-out metric is reported with its 95 % bootstrap interval over the evaluation samples,
and the handed-out plan is compared with the uniform plan that fits on the same samples
(paired intervals; :meth:`allocator.jobs.pipeline.RunResult.vs_uniform`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.atomic import atomic_write_text

if TYPE_CHECKING:
    from allocator.backend import Comparison, Interval
    from allocator.core.plan import BitPlan
    from allocator.jobs.applied import AppliedChoice
    from allocator.jobs.pipeline import RunResult
    from allocator.jobs.refine import RefineResult

__all__ = ["UNIFORM_PLAN_FILE", "applied_lines", "comparison_lines", "excluded_lines", "frontier_title",
           "plan_label", "regression_warnings", "report_markdown", "run_summary", "selection_lines",
           "write_outputs"]

#: the uniform plan that fits, written beside plan.json when the handed-out plan is worse than it
#: on some held-out metric (the alternative the report offers)
UNIFORM_PLAN_FILE = "plan-uniform.json"


def write_outputs(run: RunResult, front: Any, out: Path | str,
                  files: Mapping[str, Path] | None = None) -> RunResult:
    """plan.json (the plan handed out), frontier.png, results.json (complete), report.md and,
    when the handed-out plan is worse than the uniform plan that fits on some held-out metric,
    plan-uniform.json in ``out``, beside what the stages already wrote there (``files``:
    table.parquet, ...)."""
    import json
    from dataclasses import replace

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    done = dict(files or {})
    if "table" not in done:
        done["table"] = run.table.save(d / "table.parquet")
    done |= {"plan": run.result.plan.save(d / "plan.json"),
             "frontier": _plot(run, front, d / "frontier.png"), "results": d / "results.json"}
    if run.uniform_below is not None and (run.regressions or run.worse_than_uniform):
        done["plan_uniform"] = run.uniform_below.plan.save(d / UNIFORM_PLAN_FILE)
    else:  # an earlier run's alternative in the same folder would read as this run's
        (d / UNIFORM_PLAN_FILE).unlink(missing_ok=True)
    done["report"] = d / "report.md"
    run = replace(run, files=done)  # the report names the files written beside it
    atomic_write_text(done["results"], json.dumps(run_summary(run), indent=1, default=str))
    atomic_write_text(done["report"], report_markdown(run))
    return run


def run_summary(run: RunResult) -> dict[str, Any]:
    """``results.json``: the configuration, timings, every candidate's calibration error, the
    rows evaluated on held-out data (each metric with its 95 % interval), the handed-out plan
    against the uniform plan that fits (paired intervals per metric), and whether it lost to
    uniform (JSON-able; the service's run job returns the same)."""
    from allocator.backend import DEFAULT_DRAWS, DEFAULT_LEVEL
    from allocator.jobs.stages import config_summary

    return {"stage": "done", "complete": True, "config": config_summary(run.config),
            "quantizer": run.table.metadata.get("quantizer", "rtn"),
            "model_kind": str(run.model_kind), "seconds": dict(run.seconds),
            "peak_rss_mb": dict(run.peak_rss_mb), "peak_rss_per_stage": run.peak_rss_per_stage,
            "fp": dict(run.fp_metrics),
            "error_ratio": run.error_ratio, "chosen": run.result.label,
            "worse_than_uniform": run.worse_than_uniform,
            "selection": run.selection.to_dict() if run.selection is not None else None,
            "applied_choice": run.applied.to_dict() if run.applied is not None else None,
            "excluded_units": dict(run.excluded), "data": dict(run.data_info),
            "intervals": {"level": DEFAULT_LEVEL, "draws": DEFAULT_DRAWS, "seed": run.config.estimate.seed,
                          "method": "percentile bootstrap over evaluation samples"},
            "vs_uniform": {k: c.to_dict() for k, c in run.vs_uniform.items()},
            "worse_than_uniform_on": [c.metric for c in run.regressions],
            "rows": [{"label": r.label, "bpw": r.bpw, "size_bytes": r.size_bytes,
                      "predicted_cost": r.plan.summary.predicted_cost, "error": r.report.error,
                      "error_metric": r.report.error_metric, "metrics": dict(r.report.metrics),
                      "intervals": {k: i.to_dict() for k, i in run.intervals(r).items()},
                      "verified": r.verified, "options": _option_counts(r.plan)} for r in run.rows]}


def _option_counts(plan: BitPlan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in plan.assignments.values():
        counts[a.option] = counts.get(a.option, 0) + 1
    return dict(sorted(counts.items()))


def _plot(run: RunResult, front: Any, path: Path) -> Path:
    # A bare Figure renders with Agg without touching pyplot's global backend (Jupyter keeps inline).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    ax.plot(front.bpw, front.cost, "-", lw=1.2, color="0.4", label="Pareto frontier (predicted)")
    for r, style in zip(run.rows, ("s", "*", "^"), strict=False):
        ax.plot([r.bpw], [max(r.plan.summary.predicted_cost, 1e-12)], style, ms=10 if style == "*" else 7,
                label=f"{r.label} {plan_label(r.plan)}: "
                      f"measured {r.report.error_metric}={r.report.error:.3g}")
    ax.axvline(run.config.bpw, ls=":", color="0.6")
    if (front.cost > 0).any():
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (overhead included)")
    ax.set_ylabel(f"predicted cost ({run.table.metadata.get('estimator')})")
    ax.set_title(frontier_title(run.config.model, run.config.bpw), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def frontier_title(model: str, bpw: float, *, width: int = 60) -> str:
    """The frontier plot's title: the model's base name (not its whole path, which ran off the
    figure), wrapped to lines of at most ``width`` characters."""
    import textwrap

    name = Path(model.rstrip("/\\")).name or model
    return "\n".join(textwrap.wrap(f"{name}: frontier and plans at {bpw:g} bpw", width=width,
                                    break_long_words=True, break_on_hyphens=False))


def plan_label(plan: BitPlan) -> str:
    opts = _option_counts(plan)
    return next(iter(opts)) if len(opts) == 1 else f"({len(opts)} options)"


def report_markdown(run: RunResult) -> str:
    """A short Markdown report: setup, the comparison table, the mixed plan's option counts."""
    c = run.config
    m = run.mixed.report
    lines = [
        f"# bitalloc run: {c.model} at {c.bpw:g} bpw", "",
        f"- model kind: {run.model_kind}; units: {run.table.n_units}; "
        f"params quantized: {run.table.total_params:,}",
        f"- estimator: `{c.estimate.method}` on {c.estimate.samples} calibration samples "
        f"({run.data_info.get('calibration', 'built-in corpus, calibration split')}); "
        f"solver: `{c.solver}`; apply: `{c.method}`",
        f"- evaluation: {m.n_samples} held-out samples ("
        f"{run.data_info.get('evaluation', 'built-in corpus, evaluation split')});"
        f" error = `{m.error_metric}` vs the full-precision model",
        *excluded_lines(run.excluded),
        "- uniform ≤: the uniform int option with the most bits whose size fits the budget "
        "(equal-size baseline); uniform >: the next uniform option above the budget (context)",
        "- mixed: the cost table's optimum; chosen: the plan in `plan.json` — the best of the "
        "measured candidates on the validation share of the calibration data, refined at its own "
        "operating point",
        "- each metric: value [95 % bootstrap interval over the held-out samples]", "",
        "| plan | bpw | size (KiB) | predicted cost | " + " | ".join(m.metrics) + " | verified |",
        "|---|---|---|---|" + "---|" * len(m.metrics) + "---|",
    ]
    for r in run.rows:
        ci = run.intervals(r)
        vals = " | ".join(_cell(r.report.metrics.get(k, float("nan")), ci.get(k)) for k in m.metrics)
        lines.append(f"| {r.label} {plan_label(r.plan)} | {r.bpw:.4f} | {r.size_bytes / 1024:,.1f} | "
                     f"{r.plan.summary.predicted_cost:.4g} | {vals} | {'yes' if r.verified else 'NO'} |")
    ratio = run.error_ratio
    if ratio is not None:
        lines += ["", f"Chosen / uniform-at-equal-size held-out error ratio: **{ratio:.3f}**"
                  f" ({'better' if ratio < 1 else 'not better'})."]
    if run.worse_than_uniform:
        lines += ["", "**Warning: the chosen plan measured worse than the uniform plan that fits on "
                  "held-out data** (it was better on calibration data); consider more calibration "
                  "samples or the uniform plan."]
    lines += comparison_lines(run)
    lines += selection_lines(run.selection)
    lines += applied_lines(run.applied)
    if run.fp_metrics:
        lines += ["", "Full precision: " + ", ".join(f"{k} {v:.4g}" for k, v in run.fp_metrics.items())]
    lines += ["", "Mixed plan, units per option: " + ", ".join(
        f"`{k}` × {v}" for k, v in _option_counts(run.mixed.plan).items()),
        "Chosen plan, units per option: " + ", ".join(
        f"`{k}` × {v}" for k, v in _option_counts(run.result.plan).items()), "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in run.seconds.items()), "",
        "Files: `plan.json` (the chosen plan), `table.parquet` (cost table), `frontier.png`, "
        "`results.json`" + (f", `{UNIFORM_PLAN_FILE}` (the uniform plan that fits, the alternative)"
                            if "plan_uniform" in run.files else "") + ".", ""]
    return "\n".join(lines)


def _cell(value: float, ci: Interval | None) -> str:
    return f"{value:.4g}" if ci is None else f"{value:.4g} [{ci.lo:.4g}, {ci.hi:.4g}]"


def _delta(c: Comparison) -> str:
    """``chosen / uniform 1.01 [1.004, 1.016]`` or ``chosen − uniform −0.01 [−0.02, −0.003]``."""
    from allocator.backend import Contrast

    op = "/" if c.contrast is Contrast.RATIO else "−"
    return f"chosen {op} uniform {c.delta.text()}"


def comparison_lines(run: RunResult) -> list[str]:
    """The handed-out plan against the uniform plan that fits, metric by metric (paired 95 %
    intervals), and a bold warning for each metric on which it is worse beyond its interval."""
    below = run.uniform_below
    if below is None or not run.vs_uniform:
        return []
    if run.result.plan.choice == below.plan.choice:
        return ["", "The chosen plan is the uniform plan that fits."]
    lines = ["", f"Chosen vs uniform ≤ {plan_label(below.plan)} on the same held-out samples "
             "(paired bootstrap: both plans resampled together; 95 % intervals):", "",
             "| metric | better | chosen | uniform ≤ | chosen vs uniform | verdict |",
             "|---|---|---|---|---|---|"]
    for k, c in run.vs_uniform.items():
        verdict = "**worse**" if c.worse else c.verdict
        if not c.worse and not c.better and c.point_worse:
            verdict += " (point estimate worse)"
        lines.append(f"| {k} | {'higher' if c.higher_is_better else 'lower'} | {c.a.text()} | "
                     f"{c.b.text()} | {_delta(c)} | {verdict} |")
    warnings = regression_warnings(run)
    if not warnings:
        return [*lines, "", "No metric of the chosen plan is worse than the uniform plan's beyond "
                "its 95 % interval."]
    return [*lines, "", *(f"**Warning: {w}**" for w in warnings)]


def regression_warnings(run: RunResult) -> list[str]:
    """One sentence per held-out metric on which the handed-out plan is worse than the uniform
    plan that fits beyond the paired 95 % interval, naming both values and the alternative."""
    below = run.uniform_below
    if below is None:
        return []
    optimised = run.result.report.error_metric
    where = (f"written to `{UNIFORM_PLAN_FILE}`" if "plan_uniform" in run.files
             else f"uniform {plan_label(below.plan)}")
    out = []
    for c in run.regressions:
        why = ("the metric the plan was chosen on" if c.metric == optimised
               else f"although the plan was chosen on {optimised}")
        out.append(f"the chosen plan is worse than the uniform plan that fits "
                   f"({plan_label(below.plan)}) on {c.metric} beyond its 95 % interval "
                   f"({why}): {c.a.text()} vs {c.b.text()} "
                   f"({'higher' if c.higher_is_better else 'lower'} is better; {_delta(c)}). "
                   f"The uniform plan is the alternative ({where}).")
    return out


def excluded_lines(excluded: Mapping[str, str]) -> list[str]:
    """Report lines for the units left out of the budget, grouped by reason."""
    by: dict[str, list[str]] = {}
    for unit, why in excluded.items():
        by.setdefault(why, []).append(unit)
    return [f"- left out of the budget, {why}: " + ", ".join(f"`{u}`" for u in units[:8])
            + (f" … ({len(units)} in all)" if len(units) > 8 else "") for why, units in by.items()]


def selection_lines(sel: RefineResult | None) -> list[str]:
    """How the handed-out plan was chosen: each candidate's and each refinement round's error on
    the fit share (the moves were measured there) and on the validation share (what judged
    them), or on the calibration data when there was no validation share."""
    if sel is None:
        return []
    if not sel.validation:
        lines = ["", "Selection on calibration data (no validation share): " + ", ".join(
            f"{k} {v:.4g}" for k, v in sel.candidates.items())
            + f"; started from **{sel.start_label}**."]
        for r in sel.rounds:
            lines.append(f"- refine round {r.index}: {r.error_before:.4g} → {r.error_trial:.4g} "
                         f"({'accepted' if r.accepted else 'rejected'}, {r.moved} units moved, "
                         f"trust {r.trust})")
        lines.append(f"Refinement {sel.status}: calibration error {sel.start_error:.4g} → "
                     f"{sel.error:.4g} ({100 * sel.improvement:.1f} % lower).")
        return lines
    v = sel.validation
    counts = f" ({v['n_fit']} fit / {v['n_validation']} validation samples, by sample hash)" \
        if "n_fit" in v else ""
    fit = sel.candidates_fit
    lines = ["", f"Selection judged on the validation share{counts}; error fit / validation: "
             + ", ".join(f"{k} {fit[k]:.4g} / {e:.4g}" if k in fit else f"{k} ? / {e:.4g}"
                         for k, e in sel.candidates.items())
             + f"; started from **{sel.start_label}** (lowest validation error)."]
    for r in sel.rounds:
        verdict = "accepted" if r.accepted else (
            "rejected: worse on validation" if r.error_trial >= r.error_before else
            "rejected: worse on fit" if r.fit_trial >= r.fit_before else "rejected")
        lines.append(f"- refine round {r.index}: fit {r.fit_before:.4g} → {r.fit_trial:.4g}, "
                     f"validation {r.error_before:.4g} → {r.error_trial:.4g} ({verdict}, "
                     f"{r.moved} units moved, trust {r.trust})")
    fit_words = "" if sel.start_fit_error is None or sel.fit_error is None else \
        f"fit error {sel.start_fit_error:.4g} → {sel.fit_error:.4g}, "
    lines.append(f"Refinement {sel.status}: {fit_words}validation error {sel.start_error:.4g} → "
                 f"{sel.error:.4g} ({100 * sel.improvement:.1f} % lower).")
    return lines


def applied_lines(choice: AppliedChoice | None) -> list[str]:
    """The choice among the plans applied as the backend applies them (GPTQ): each plan's
    validation error, its paired comparison with uniform, and which one was handed out."""
    if choice is None:
        return []
    lines = ["", f"Plans applied as `{choice.method}` applies them (block by block, fitted on the fit "
             f"share) and measured on {choice.n_samples} validation samples; a plan worse than "
             f"uniform beyond the paired 95 % interval on any metric is ruled out, then the lowest "
             f"error wins: **{choice.chosen}**."]
    for c in choice.candidates:
        same = f" (= {', '.join(c.same_as)})" if c.same_as else ""
        vs = "; ".join(f"{m} / uniform {cmp.delta.text()}" + (" **worse**" if cmp.worse else "")
                       for m, cmp in c.vs_uniform.items())
        lines.append(f"- {c.label}{same}: error {c.error:.4g}" + (f"; {vs}" if vs else ""))
    return lines
