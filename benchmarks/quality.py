"""Quality benchmark: mixed plans vs uniform and a llama.cpp-style rule mix at equal size.

For each model and each estimator (``sensitivity.ESTIMATORS``; ones that fail to import or run
are skipped and reported) × solver (mckp, closed_form when registered) × bpw, the plan is
applied with RTN and evaluated on the held-out ``evaluation`` split of the built-in corpus
(disjoint from the ``calibration`` split the estimators see). Baselines at the same budget:

* uniform — the uniform int option with the most bits whose size fits the budget;
* rule mix — llama.cpp-style: attention-value and FFN-down projections and the first and last
  blocks get +1 bit over the rest; the base bits are the largest that fit, then units are
  promoted by the rule's priority (v/down first, then first/last blocks) while the budget allows.

Also the Spearman correlation of predicted cost vs measured error along the frontier (a few
frontier plans per estimator). Prints a Markdown table; ``--json`` writes every number.

    PYTHONPATH=. python benchmarks/quality.py --quick            # MiniLM, 3 estimators, 3.0 bpw
    PYTHONPATH=. python benchmarks/quality.py                    # both models, all estimators
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/ holds a sensitivity.py script that would shadow the package: the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rule_mix(table: Any, budget_bits: float) -> dict[str, str] | None:
    """llama.cpp-style rule plan (see the module docstring) within ``budget_bits``."""
    from allocator.core.formats import FormatKind, parse_format

    df = table.df
    ints = sorted({o for o in table.options if parse_format(o).kind is FormatKind.INT},
                  key=lambda o: parse_format(o).bits)
    by_bits = {parse_format(o).bits: o for o in ints}
    size = {(u, o): s for u, o, s in zip(df["unit"], df["option"], df["size_bits"], strict=True)}
    blocks = sorted({int(m[1]) for u in table.units if (m := re.search(r"\.(\d+)\.", u))})
    edge = {blocks[0], blocks[-1]} if blocks else set()

    def priority(u: str) -> int:
        m = re.search(r"\.(\d+)\.", u)
        vdown = bool(re.search(r"(v_proj|value|down_proj|output\.dense$|fc2|w2)", u))
        return 0 if vdown else 1 if (m and int(m[1]) in edge) else 2
    units = sorted(table.units, key=priority)
    for base in sorted(by_bits, reverse=True):
        choice = dict.fromkeys(table.units, by_bits[base])
        total = sum(size[(u, by_bits[base])] for u in table.units)
        if total > budget_bits:
            continue
        up = by_bits.get(base + 1)
        for u in units:
            if up is None or priority(u) == 2:
                break
            extra = size[(u, up)] - size[(u, by_bits[base])]
            if total + extra <= budget_bits:
                choice[u], total = up, total + extra
        return choice
    return None


def _measure(model: Any, state: Any, units: Any, held: Any, ref: Any, plan: Any) -> float:
    """Measured error of ``plan`` (RTN) on the held-out batches; weights restored after."""
    from allocator.backend import apply_plan, evaluate

    model.load_state_dict(state)
    apply_plan(model, plan, units=units)
    err = evaluate(model, held, ref).error
    model.load_state_dict(state)
    return err


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="MiniLM only, estimators hessian-proxy/salience/datafree, 3.0 bpw, small data")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--estimators", nargs="+", default=None)
    p.add_argument("--bpw", type=float, nargs="+", default=None)
    p.add_argument("--samples", type=int, default=None, help="calibration samples")
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--frontier-points", type=int, default=5)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    import sensitivity
    import solvers
    from allocator.backend import reference_outputs
    from allocator.core.budget import Budget
    from allocator.core.plan import BitPlan
    from allocator.core.units import discover_units
    from allocator.jobs.pipeline import RunConfig, estimate_table, run_spec, uniform_plans
    from allocator.model.data import user_data_for
    from allocator.model.loading import load_model

    models = args.models or (["minilm"] if args.quick else ["minilm", "tiny-llama"])
    estimators = args.estimators or (["hessian-proxy", "salience", "datafree"] if args.quick
                                     else list(sensitivity.ESTIMATORS))
    bpws = args.bpw or ([3.0] if args.quick else [2.5, 3.0, 3.5, 4.0])
    n_cal = args.samples or (16 if args.quick else 32)
    n_eval = args.eval_samples or (32 if args.quick else 64)
    solver_names = [s for s in ("mckp", "closed_form") if s in solvers.SOLVERS]
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for model_name in models:
        try:
            loaded = load_model(model_name)
        except Exception as exc:  # a missing model is reported, not fatal
            skipped.append(f"model {model_name}: {exc}")
            continue
        cfg = RunConfig(model=model_name, estimate=run_spec(samples=n_cal, progress=False),
                        eval_samples=n_eval, out=None)
        common = {"seq_len": cfg.estimate.seq_len, "batch_size": cfg.estimate.batch_size,
                  "seed": cfg.estimate.seed}
        calib = user_data_for(loaded, "calibration", n_cal, **common)
        held = user_data_for(loaded, "evaluation", n_eval, **common)
        units = discover_units(loaded.model)
        state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        ref = reference_outputs(loaded.model, list(held), kind=loaded.kind,
                                model_fingerprint=loaded.fingerprint)

        measure = partial(_measure, loaded.model, state, units, list(held), ref)
        base_table = None
        for est in estimators:
            t0 = time.perf_counter()
            try:
                run_cfg = RunConfig(model=model_name, estimate=run_spec(est, samples=n_cal, progress=False),
                                    out=None)
                table = estimate_table(loaded, calib, run_cfg, units)
            except Exception as exc:
                skipped.append(f"{model_name}/{est}: {type(exc).__name__}: {str(exc)[:120]}")
                traceback.print_exc(limit=1, file=sys.stderr)
                continue
            base_table = table
            est_s = time.perf_counter() - t0
            front = solvers.frontier(table)
            picks = np.unique(np.linspace(0, len(front) - 1, args.frontier_points).round().astype(int))
            pred = [float(front.cost[i]) for i in picks]
            meas = [measure(front.plan(int(i))) for i in picks]
            rho = spearman(pred, meas)
            for bpw in bpws:
                for sv in solver_names:
                    try:
                        res = solvers.solve(table, Budget(bpw=bpw), solver=sv)
                    except Exception as exc:
                        skipped.append(f"{model_name}/{est}/{sv}: {type(exc).__name__}: {exc}")
                        continue
                    if res.plan is None:
                        continue
                    results.append({"model": model_name, "estimator": est, "solver": sv, "bpw": bpw,
                                    "plan_bpw": res.plan.summary.bpw, "error": measure(res.plan),
                                    "spearman": rho, "estimate_s": est_s})
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if base_table is None:
            continue
        for bpw in bpws:
            cap = Budget(bpw=bpw).size_cap_bits(base_table.total_params)
            below, above = uniform_plans(base_table, cap)
            rule = rule_mix(base_table, cap)
            for label, plan in (("uniform ≤", below), ("uniform >", above),
                                ("rule mix", BitPlan.from_choice(base_table, rule) if rule else None)):
                if plan is not None:
                    results.append({"model": model_name, "estimator": label, "solver": "-", "bpw": bpw,
                                    "plan_bpw": plan.summary.bpw, "error": measure(plan)})
    print_markdown(results, skipped)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "skipped": skipped}, fh, indent=1)
    return 0


def print_markdown(results: list[dict[str, Any]], skipped: list[str]) -> None:
    print("| model | bpw | plan | solver | plan bpw | measured error | × uniform ≤ | × rule mix | Spearman |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = [x for x in results if x["model"] == r["model"] and x["bpw"] == r["bpw"]]
        uni = next((x["error"] for x in same if x["estimator"] == "uniform ≤"), None)
        rule = next((x["error"] for x in same if x["estimator"] == "rule mix"), None)
        ratio_u = f"{r['error'] / uni:.3f}" if uni else "-"
        ratio_r = f"{r['error'] / rule:.3f}" if rule else "-"
        rho = f"{r['spearman']:.2f}" if "spearman" in r else "-"
        print(f"| {r['model']} | {r['bpw']:g} | {r['estimator']} | {r['solver']} | {r['plan_bpw']:.3f} | "
              f"{r['error']:.4g} | {ratio_u} | {ratio_r} | {rho} |")
    for s in skipped:
        print(f"- skipped: {s}")


if __name__ == "__main__":
    sys.exit(main())
