"""Benchmark: registered solvers vs PuLP + CBC on synthetic tables of 1e2 … 1e6 units.

Run:  PYTHONPATH=. python benchmarks/solvers.py [--max-units 1000000] [--cbc-limit 120]

Tables come from :func:`allocator.core.synth.synth_table` (Llama-7B layer shapes, cost ∝ s·n·4^-b);
the budget is 4.1 bits per weight. CBC is asked for a relative gap of 1e-9; where it stops at
its limit first, the time ratio is a lower bound and its (worse) objective is shown. For each
size every registered solver that is installed (mckp, ilp, closed_form, greedy; missing
modules are skipped) runs ``solve()`` end to end —
problem build, solve, central plan check, plan — and the baseline, PuLP + CBC, is built here
directly with pulp (one binary per unit × option, one assignment row per unit, the size row) and
timed from model build to solution. CBC runs up to the first size where it misses its time
limit. Times are the best of ``--repeats`` runs for tables up to 1e4 units, one run above.
The frontier is timed at 1e4 units, and closed_form's objective is compared with the optimum.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

# This file is named like the package it measures: keep its folder off the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

SIZES = [(100, 6), (1_000, 6), (10_000, 6), (100_000, 8), (1_000_000, 8)]
SOLVERS = ["mckp", "ilp", "closed_form", "greedy"]


def cbc(table: Any, budget: Any, limit: float) -> tuple[float, float | None, str]:
    """(seconds, objective or None, status) of PuLP + CBC on the same problem."""
    import pulp

    import solvers

    t0 = time.perf_counter()
    p = solvers.build_problem(table, budget)
    m = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat="Binary")
         for i in range(p.n_items) for j in range(p.n_slots) if p.valid[i, j]}
    m += pulp.lpSum(float(p.cost[i, j]) * v for (i, j), v in x.items())
    for i in range(p.n_items):
        m += pulp.lpSum(x[i, j] for j in range(p.n_slots) if (i, j) in x) == 1
    m += pulp.lpSum(float(p.size[i, j]) * v for (i, j), v in x.items()) <= p.cap
    m.solve(pulp.PULP_CBC_CMD(msg=0, gapRel=1e-9, timeLimit=limit))
    seconds = time.perf_counter() - t0
    status = pulp.LpStatus[m.status]
    value = pulp.value(m.objective)
    finished = status == "Optimal" and seconds < limit
    return seconds, (float(value) if value is not None else None), \
        ("optimal" if finished else f"stopped ({status})")


def time_solve(name: str, table: Any, budget: Any, repeats: int, **kw: Any) -> tuple[float, Any]:
    import solvers

    solver = solvers.solver_class(name)(**kw)
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = solver.solve(table, budget)
        best = min(best, time.perf_counter() - t0)
    return best, result


def installed(name: str) -> bool:
    import solvers

    module = solvers.SOLVERS[name].split(":")[0]
    if importlib.util.find_spec(module) is None:
        return False
    try:
        return solvers.solver_class(name).is_available()
    except (ImportError, AttributeError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-units", type=int, default=1_000_000)
    ap.add_argument("--cbc-limit", type=float, default=120.0, help="CBC time limit in seconds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bpw", type=float, default=4.1)
    args = ap.parse_args()

    import solvers
    from allocator import Budget
    from allocator.core.synth import synth_table

    names = [n for n in SOLVERS if installed(n)]
    skipped = [n for n in SOLVERS if n not in names]
    budget = Budget(bpw=args.bpw)
    rows: list[str] = []
    notes: list[str] = []
    cbc_on = True
    for n_units, n_opts in SIZES:
        if n_units > args.max_units:
            break
        table = synth_table(n_units=n_units, n_options=n_opts, seed=0)
        table.fingerprint  # noqa: B018 - computed once per table, as any caller's first solve would
        reps = args.repeats if n_units <= 10_000 else 1
        base_s, base_obj, base_status = (math.nan, None, "not run")
        if cbc_on:
            base_s, base_obj, base_status = cbc(table, budget, args.cbc_limit)
            # past 1e4 units only while CBC still proves optimality in its limit
            cbc_on = base_status == "optimal" or n_units < 10_000
        optimum = None
        for name in names:
            variants: list[tuple[str, dict[str, Any]]] = [(name, {})]
            if name == "mckp" and n_units >= 100_000:
                variants.append(("mckp rel_gap=1e-6", {"rel_gap": 1e-6}))
            for label, kw in variants:
                sec, r = time_solve(name, table, budget, reps, **kw)
                if name == "mckp" and not kw and r.status.value == "optimal":
                    optimum = r.objective
                ratio, same = "–", "–"
                if not math.isnan(base_s):  # a stopped CBC makes the ratio a lower bound
                    ratio = ("" if base_status == "optimal" else "≥ ") + f"{base_s / sec:,.0f}×"
                if base_obj is not None and r.objective is not None:
                    same = "yes" if math.isclose(r.objective, base_obj, rel_tol=1e-9) else \
                        f"CBC {(base_obj - r.objective) / r.objective:+.2e}"
                gap = "–" if r.gap is None else f"{r.gap:.1e}"
                obj = "–" if r.objective is None else f"{r.objective:.10g}"
                rows.append(f"| {n_units:,} × {n_opts} | {label} | {sec:.3f} | {r.status.value} | "
                            f"{gap} | {obj} | {ratio} | {same} |")
                if name == "closed_form" and optimum and r.objective is not None:
                    notes.append(f"closed_form at {n_units:,} units: objective "
                                 f"{(r.objective - optimum) / optimum:+.3%} vs the optimum")
        cbc_obj = "–" if base_obj is None else f"{base_obj:.10g}"
        cbc_t = "–" if math.isnan(base_s) else f"{base_s:.3f}"
        rows.append(f"| {n_units:,} × {n_opts} | PuLP+CBC (baseline) | {cbc_t} | {base_status} | "
                    f"– | {cbc_obj} | 1× | – |")
        if n_units == 10_000:
            t0 = time.perf_counter()
            f = solvers.frontier(table)
            notes.append(f"frontier at 10,000 × {n_opts}: {len(f):,} hull points in "
                         f"{time.perf_counter() - t0:.3f} s")
    print(f"Machine: {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}; budget bpw={args.bpw}; CBC limit {args.cbc_limit:g} s; "
          f"skipped (not installed): {', '.join(skipped) or 'none'}\n")
    print("| units × options | solver | seconds | status | gap | objective | CBC time / time | "
          "CBC objective (rel. to this) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
