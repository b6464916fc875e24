"""``bitalloc search``: Bayesian refinement of the cost-table optimum with real evaluations."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.cli._common import (
    add_budget_arguments,
    add_device_argument,
    budget_from_args,
    console,
    device_from_args,
)
from allocator.cli._run import add_data_arguments

if TYPE_CHECKING:
    from allocator.core.plan import BitPlan
    from allocator.jobs.search import SearchSpec

HELP = "refine a plan by Bayesian search (Optuna TPE) with a real evaluator in the loop"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="cost table (.parquet/.csv/.json)")
    add_budget_arguments(p)
    p.add_argument("--model", help="model to evaluate on (local HF dir, 'minilm', 'tiny-llama'); "
                   "without it the table's own cost is the objective")
    p.add_argument("--trials", type=int, default=50, help="trials in the study in total (default 50)")
    p.add_argument("--radius", type=int, default=1, help="hull steps each unit may move (default 1)")
    p.add_argument("--granularity", default="unit", choices=["unit", "block"],
                   help="search one option per unit, or one hull-step offset per transformer block "
                   "(large models)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="how plans are applied")
    p.add_argument("--samples", type=int, default=32, help="evaluation sequences (default 32)")
    add_data_arguments(p)
    p.add_argument("--storage", help="Optuna storage URL: sqlite:///search.db or postgresql://...")
    p.add_argument("--study", help="study name (shared by workers; re-run to resume)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--no-prune", action="store_true", help="evaluate every trial fully")
    p.add_argument("--seed", type=int, default=0)
    # the search evaluator (allocator.jobs.search.SearchSpec) has no device yet: cpu only
    add_device_argument(p, cpu_only="search")
    p.add_argument("--pareto", metavar="FRONT.csv",
                   help="run NSGA-II instead: write the measured size-vs-error front below the budget "
                   "to this CSV, each front plan beside it as FRONT-<k>.json")
    p.add_argument("-o", "--output", default="plan.json", help="where to write the best plan")


def run(args: argparse.Namespace) -> int:
    from allocator.jobs.search import EvaluatorKind, SearchSpec, run_search

    device_from_args(args, cpu_only="search")
    budget = budget_from_args(args)
    spec = SearchSpec(
        table_path=str(Path(args.table)), budget=budget.to_dict(), n_trials=args.trials, seed=args.seed,
        storage=args.storage, study=args.study, radius=args.radius, prune=not args.no_prune,
        granularity=args.granularity,
        evaluator=EvaluatorKind.MODEL if args.model else EvaluatorKind.TABLE, model=args.model,
        method=args.method, samples=args.samples, progress=True, data=args.data,
        eval_data=args.eval_data,
    )
    if args.pareto:
        return _pareto(spec, Path(args.pareto))
    result = run_search(spec, workers=args.workers)
    out = console()
    out.print(f"status {result.status}  {result.message}")
    if result.plan is None:
        return 1
    result.plan.save(args.output)
    s = result.plan.summary
    out.print(f"bpw {s.bpw:.4f}  predicted cost {s.predicted_cost:.6g}  "
              f"measured {result.stats.get('measured_error', float('nan')):.6g}  -> {args.output}")
    if spec.data or spec.eval_data:
        _held_out(spec, result.plan)
    return 0


def _held_out(spec: SearchSpec, plan: BitPlan) -> None:
    """The best plan on the held-out data (--eval-data, or the held-out share of --data)."""
    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.model.data import user_data_for
    from allocator.model.loading import load_model

    loaded = load_model(str(spec.model))
    files: dict[str, Any] = {"data": spec.data, "eval_data": spec.eval_data,
                             "seq_len": spec.seq_len, "batch_size": 8, "seed": spec.seed}
    held = user_data_for(loaded, "evaluation", spec.samples, **files)
    ref = reference_outputs(loaded.model, list(held), kind=loaded.kind,
                            model_fingerprint=loaded.fingerprint)
    calib = (list(user_data_for(loaded, "calibration", spec.samples, **files))
             if spec.method == "gptq" else None)
    apply_plan(loaded.model, plan, method=spec.method, calibration=calib)
    rep = evaluate(loaded.model, list(held), ref)
    console().print(f"held-out ({held.metadata()['source']}, {held.n_samples} samples): "
                    f"{rep.error_metric} {rep.error:.6g}")


def _pareto(spec: SearchSpec, path: Path) -> int:
    import csv

    from allocator.jobs.search import run_pareto

    points = run_pareto(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["bpw", "size_bits", "measured_error", "plan"])
        for k, pt in enumerate(points):
            plan_path = path.with_name(f"{path.stem}-{k}.json")
            pt.plan.save(plan_path)
            w.writerow([f"{pt.bpw:.6f}", f"{pt.size_bits:.0f}", f"{pt.error:.8g}", plan_path.name])
    console().print(f"{len(points)} plans on the measured front -> {path}")
    return 0
