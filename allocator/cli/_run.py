"""``bitalloc run``: estimate → frontier → solve → apply → evaluate for a local HF model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from allocator.cli._common import add_device_argument, add_for_argument, console, device_from_args
from allocator.model.data.split import DEFAULT_VALIDATION_SHARE
from sensitivity import DEFAULT_SEQ_LEN

HELP = "end-to-end: estimate, solve at a bpw, apply, evaluate vs uniform at equal size"


def add_common(p: argparse.ArgumentParser, *, out: str, estimator: str, calib: int, evals: int) -> None:
    p.add_argument("--bpw", type=float, default=3.0, help="target bits per weight (default 3.0)")
    p.add_argument("--estimator", default=estimator, help=f"sensitivity estimator (default {estimator})")
    p.add_argument("--solver", default="mckp", help="solver (default mckp, exact)")
    p.add_argument("--method", choices=("auto", "rtn", "gptq", "ggml"), default="auto",
                   help="the plan's quantizer, used by every stage: costs, candidate choice, "
                   "refinement and apply (default auto: ggml with --for llamacpp, else rtn; gptq: "
                   "GPTQ per unit from calibration Hessians; ggml: llama.cpp's own quantizers for "
                   "GGUF options with an imatrix from the calibration data, docs/quantizer.md)")
    p.add_argument("--options", help="candidate options (default 'dense': int2..8-g128-asym with g64 "
                   "and sym variants, docs/quality.md; 'default': int2..8-g128-asym + fp16)")
    add_for_argument(p, "estimate and solve over")
    p.add_argument("--samples", type=int, default=calib, help=f"calibration samples (default {calib})")
    p.add_argument("--eval-samples", type=int, default=evals,
                   help=f"held-out evaluation samples (default {evals})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    add_data_arguments(p)
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only units whose name matches this glob, e.g. '*.attention.*' "
                        "(repeatable; '*' matches dots too; a module selects everything under "
                        "it; the syntax of estimate --include)")
    p.add_argument("--groups", type=int, default=None, metavar="G",
                   help="units of G input columns instead of whole modules (denser allocation for "
                        "bitalloc's own backend; consumers need --lossy to export such plans)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave units whose name matches this glob out of the budget, e.g. "
                        "'pooler' or '*.o_proj' (repeatable)")
    p.add_argument("--keep-inert", action="store_true",
                   help="keep units whose output cannot reach the measured output (e.g. a BERT "
                        "pooler under mean pooling) in the budget; by default they are left out "
                        "at full precision and listed in the report")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    # the pipeline (allocator.jobs.pipeline.RunConfig) has no device yet: cpu only, said clearly
    verb = out.removeprefix("bitalloc-")
    add_device_argument(p, cpu_only=verb)
    p.set_defaults(device_verb=verb)
    p.add_argument("--refine-rounds", type=int, default=4,
                   help="operating-point refinement rounds (moves measured on the calibration "
                        "data's fit share, judged on its validation share); 0 only picks the best "
                        "candidate on validation (table optimum or uniform) (default 4)")
    p.add_argument("--refine-neighbours", type=int, default=1,
                   help="options measured on each side of a unit's current one per round (default 1)")
    p.add_argument("--refine-time", type=float, default=300.0,
                   help="seconds for measuring the candidates and refining; the best measured "
                   "plan so far is kept (default 300)")
    p.add_argument("--validation-share", type=float, default=DEFAULT_VALIDATION_SHARE,
                   help="share of the calibration samples (by sample hash) kept out of the estimate "
                   "and the move measurements to judge the candidates and every refinement move "
                   f"(default {DEFAULT_VALIDATION_SHARE:g}; 0: the calibration data judges itself)")
    p.add_argument("--out", default=out, help=f"output directory (default {out}); each stage's "
                   "output lands there as soon as it exists (table.parquet first)")
    p.add_argument("--table", metavar="FILE",
                   help="start from this saved cost table (of this model and these units) and skip "
                        "the estimate")
    p.add_argument("--resume", action="store_true",
                   help="reuse OUT/table.parquet of an earlier run when it was estimated for this "
                        "model and these settings (refused otherwise); estimate when there is none")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_data_arguments(p: argparse.ArgumentParser, *, calibration_only: bool = False) -> None:
    """``--data`` (and ``--eval-data``): the user's text, in the formats of ``estimate --data``."""
    fmt = (".txt (one text per blank-line-separated paragraph) or .jsonl with a 'text' field, or "
           "builtin:DOMAIN (docs, code, prose, instructions, multilingual: one domain of the built-in "
           "corpus)")
    if calibration_only:
        p.add_argument("--data", metavar="FILE",
                       help=f"calibration texts, used whole: {fmt} (default: the built-in corpus, "
                            "the mix of every domain)")
        return
    p.add_argument("--data", metavar="FILE",
                   help=f"calibration texts: {fmt} (default: the built-in corpus, the mix of every "
                        "domain); without --eval-data, 25 %% of a file's texts (chosen by text hash) "
                        "are held out for evaluation, a built-in domain's evaluation split otherwise")
    p.add_argument("--eval-data", metavar="FILE",
                   help="held-out evaluation texts, same formats (default: the held-out share of "
                        "--data, else the built-in corpus' evaluation split)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory (or minilm / tiny-llama / "
                                 "vit-digits)")
    add_common(p, out="bitalloc-run", estimator="gauss-newton", calib=32, evals=64)


def config_from_args(args: argparse.Namespace, model: str) -> Any:
    """The :class:`~allocator.jobs.pipeline.RunConfig` of the flags; the estimate's flags map
    onto its :class:`~sensitivity.EstimateSpec` (:func:`~allocator.jobs.pipeline.run_spec`)."""
    from allocator.jobs.pipeline import RunConfig, run_spec

    device_from_args(args, cpu_only=getattr(args, "device_verb", "run"))
    spec = run_spec(args.estimator, options=args.options, samples=args.samples,
                    seq_len=args.seq_len, seed=args.seed, progress=not args.no_progress,
                    data=args.data, include=tuple(args.include), exclude=tuple(args.exclude),
                    groups=args.groups)
    return RunConfig(model=model, bpw=args.bpw, estimate=spec, solver=args.solver,
                     method=args.method, consumer=args.consumer, eval_samples=args.eval_samples,
                     refine_rounds=args.refine_rounds, refine_neighbours=args.refine_neighbours,
                     refine_time_limit=args.refine_time, out=Path(args.out),
                     validation_share=args.validation_share,
                     eval_data=args.eval_data, drop_inert=not args.keep_inert,
                     table=args.table, resume=args.resume)


def execute(cfg: Any) -> int:
    from rich.table import Table

    from allocator.jobs.pipeline import run_pipeline

    out = console()
    if not out.is_terminal:  # logs and pipes: room for every column instead of 80
        out.width = 130
    t0 = time.perf_counter()
    with out.status("starting", spinner="dots") as status:
        def stage(msg: str) -> None:
            status.update(msg)
            out.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/dim] {msg}")
        run = run_pipeline(cfg, on_stage=stage)
    metrics = list(run.result.report.metrics)
    table = Table(title=f"{cfg.model}: plans vs uniform at {cfg.bpw:g} bpw "
                  f"(error = {run.mixed.report.error_metric} vs full precision, held-out data)")
    for col in ("plan", "bpw", "size KiB", "predicted", *metrics, "verified"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in run.rows:
        opts = {a.option for a in r.plan.assignments.values()}
        name = f"{r.label} {next(iter(opts))}" if len(opts) == 1 else f"{r.label} ({len(opts)} options)"
        style = "bold green" if r is run.result else None
        table.add_row(name, f"{r.bpw:.4f}", f"{r.size_bytes / 1024:,.1f}",
                      f"{r.plan.summary.predicted_cost:.4g}",
                      *(f"{r.report.metrics[m]:.4g}" for m in metrics),
                      "yes" if r.verified else "[red]NO[/red]", style=style)
    out.print(table)
    sel = run.selection
    if sel is not None:
        out.print(f"{sel.judged_on} error of the candidates: " + ", ".join(
            f"{k} {v:.4g}" for k, v in sel.candidates.items()) + f"; refined from {sel.start_label}: "
            f"{sel.start_error:.4g} → {sel.error:.4g} in {len(sel.rounds)} rounds ({sel.status})"
            + ("" if sel.fit_error is None or not sel.validation else
               f"; fit share {sel.start_fit_error:.4g} → {sel.fit_error:.4g}"))
    if run.applied is not None:
        a = run.applied
        out.print(f"as {a.method} applies them, on {a.n_samples} validation samples: " + ", ".join(
            f"{c.label} {c.error:.4g}" + (" (worse than uniform on " + ", ".join(c.worse_on) + ")"
                                          if c.worse_on else "") for c in a.candidates)
            + f"; handed out: {a.chosen}", markup=False)
    if run.error_ratio is not None:
        out.print(f"{run.result.label} / uniform-at-equal-size held-out error: "
                  f"[bold]{run.error_ratio:.3f}[/bold]")
    if run.worse_than_uniform:
        out.print("[bold red]warning:[/bold red] the chosen plan measured worse than the uniform plan "
                  "that fits on held-out data; see report.md")
    _print_vs_uniform(out, run)
    if run.excluded:
        out.print(f"left out of the budget: {len(run.excluded)} unit(s), see report.md "
                  f"(e.g. {next(iter(run.excluded))}: {next(iter(run.excluded.values()))})")
    dropped = run.table.metadata.get("consumer_dropped") or {}
    if dropped:
        unit, why = next(iter(dropped.items()))
        out.print(f"for {cfg.consumer}: {len(dropped)} unit(s) left out of the plan at full "
                  f"precision (e.g. {unit}: {why})", markup=False)
    for name, path in run.files.items():
        out.print(f"{name:9s} -> {path}")
    out.print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0 if run.result.verified else 1


def _print_vs_uniform(out: Any, run: Any) -> None:
    """The handed-out plan against the uniform plan that fits, per metric (paired 95 % intervals),
    and a bold warning for each metric on which it is worse beyond its interval."""
    from rich.text import Text

    from allocator.backend import Contrast
    from allocator.jobs.report import regression_warnings

    if not run.vs_uniform or run.uniform_below is None or \
            run.result.plan.choice == run.uniform_below.plan.choice:
        return
    parts = [f"{k} {'ratio' if c.contrast is Contrast.RATIO else 'difference'} "
             f"{c.delta.text('.3g')}{' (worse)' if c.worse else ''}" for k, c in run.vs_uniform.items()]
    out.print(Text("vs uniform at equal size, paired 95 % intervals: " + "; ".join(parts)))
    for line in regression_warnings(run):
        out.print(Text("warning: ", style="bold red") + Text(line.replace("`", ""), style="bold"))


def run(args: argparse.Namespace) -> int:
    return execute(config_from_args(args, args.model))
