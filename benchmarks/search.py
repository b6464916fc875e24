"""Benchmark: Bayesian refinement vs the cost-table optimum at equal size, and worker throughput.

Run:  PYTHONPATH=. python benchmarks/search.py [--model minilm] [--bpw 3.0] [--trials 100]

1. A cost table on the model (``--estimator``, calibration split), the exact ``mckp`` optimum at
   ``--bpw`` (the baseline), then :class:`solvers._bayesian.BayesianSolver` with the real
   evaluator in the loop (RTN applied, output error measured on the calibration split) for at
   most ``--trials`` evaluations. Both plans are then measured on the held-out evaluation split
   (disjoint from everything the search saw) and the ratio is printed.
2. Throughput: the same search on a shared SQLite study with 1 and then 2 worker processes,
   trials per minute of each (model loading included, as a user pays it), measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This folder holds scripts named like packages (sensitivity.py); keep it off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def build_table(model: str, estimator: str, samples: int, seq_len: int):  # noqa: ANN201
    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units
    from allocator.model.data import CalibrationData
    from allocator.model.loading import load_model
    from sensitivity import EstimateContext, get_estimator

    loaded = load_model(model)
    calib = CalibrationData.from_corpus(loaded.tokenizer, split="calibration", n_samples=samples,
                                        seq_len=seq_len, batch_size=8, seed=0,
                                        pack=loaded.kind == "causal_lm")
    ctx = EstimateContext(batches=list(calib), units=list(discover_units(loaded.model)),
                          options=parse_options(None), seed=0, model_kind=loaded.kind)
    return loaded, get_estimator(estimator).estimate(loaded.model, ctx)


def held_out(loaded, samples: int, seq_len: int):  # noqa: ANN001, ANN201
    from allocator.model.data import CalibrationData

    return list(CalibrationData.from_corpus(loaded.tokenizer, split="evaluation", n_samples=samples,
                                            seq_len=seq_len, batch_size=8, seed=0,
                                            pack=loaded.kind == "causal_lm"))


def refinement(args: argparse.Namespace) -> None:
    import solvers
    from allocator import Budget
    from allocator.backend.search_eval import ModelEvaluator
    from solvers import BayesianSolver

    t0 = time.perf_counter()
    loaded, table = build_table(args.model, args.estimator, args.samples, args.seq_len)
    budget = Budget(bpw=args.bpw)
    exact = solvers.solve(table, budget)
    if exact.plan is None:
        raise SystemExit(f"no plan fits {args.bpw} bpw: {exact.message}")
    ev = ModelEvaluator(model=loaded, table=table, samples=args.samples, seq_len=args.seq_len)
    print(f"{args.model}: {len(table.units)} units, table by {args.estimator} in "
          f"{time.perf_counter() - t0:.1f} s; budget {args.bpw} bpw")
    t1 = time.perf_counter()
    r = BayesianSolver(evaluator=ev, n_trials=args.trials, radius=args.radius).solve(table, budget, seed=0)
    search_s = time.perf_counter() - t1
    if r.plan is None:
        raise SystemExit(f"search failed: {r.message}")
    test = held_out(loaded, args.eval_samples, args.seq_len)
    base = ev.report(exact.plan.choice, test)
    found = ev.report(r.plan.choice, test)
    print(f"search: {int(r.stats['trials'])} trials ({ev.calls} evaluations incl. pruned) "
          f"in {search_s:.1f} s")
    print("| plan | bpw | search-split error | held-out error | × cost-table optimum |")
    print("|---|---|---|---|---|")
    print(f"| cost-table optimum (mckp) | {exact.plan.summary.bpw:.4f} "
          f"| {r.stats['warm_measured_error']:.5f} | {base.error:.5f} | 1.000 |")
    print(f"| Bayesian refinement | {r.plan.summary.bpw:.4f} | {r.stats['measured_error']:.5f} "
          f"| {found.error:.5f} | {found.error / base.error:.3f} |")
    changed = sum(exact.plan.choice[u] != r.plan.choice[u] for u in table.units)
    print(f"units changed: {changed}; held-out {base.error_metric} lower by "
          f"{100 * (1 - found.error / base.error):.1f} % (goal ≥ 5 %)")


def throughput(args: argparse.Namespace) -> None:
    from allocator.jobs.search import EvaluatorKind, SearchSpec, run_search

    _, table = build_table(args.model, args.estimator, args.samples, args.seq_len)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        table.save(path)
        for workers in (1, 2):
            spec = SearchSpec(table_path=str(path), budget={"bpw": args.bpw}, n_trials=args.tp_trials,
                              seed=0, storage=f"sqlite:///{tmp}/w{workers}.db", study=f"w{workers}",
                              evaluator=EvaluatorKind.MODEL, model=args.model, samples=args.samples,
                              seq_len=args.seq_len, prune=False)
            t = time.perf_counter()
            run_search(spec, workers=workers)
            wall = time.perf_counter() - t
            rates[workers] = (args.tp_trials / (wall / 60), steady_rate(spec))
            print(f"{workers} worker(s): {args.tp_trials} trials in {wall:.1f} s: "
                  f"{rates[workers][0]:.1f} trials/min with start-up, "
                  f"{rates[workers][1]:.1f} trials/min from first trial start to last finish")
    print(f"2 workers / 1 worker: {rates[2][0] / rates[1][0]:.2f}× with start-up, "
          f"{rates[2][1] / rates[1][1]:.2f}× steady ({os.cpu_count()} CPU cores here)")


def steady_rate(spec) -> float:  # noqa: ANN001
    """Finished trials per minute between the first trial's start and the last one's end."""
    import optuna

    trials = [t for t in optuna.load_study(study_name=spec.study, storage=spec.storage).trials
              if t.datetime_complete is not None and t.datetime_start is not None]
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials))
    return len(trials) / (span.total_seconds() / 60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--estimator", default="hessian-proxy")
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--trials", type=int, default=100, help="evaluations the search may spend")
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32, help="sequences per evaluation (calibration split)")
    ap.add_argument("--eval-samples", type=int, default=128, help="held-out sequences for the final report")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tp-trials", type=int, default=24, help="trials per throughput run (0 = skip)")
    ap.add_argument("--skip-refinement", action="store_true", help="only measure throughput")
    args = ap.parse_args()
    if not args.skip_refinement:
        refinement(args)
    if args.tp_trials:
        throughput(args)


if __name__ == "__main__":
    main()
