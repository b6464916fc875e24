"""``bitalloc solve``: cost table + budget → bit plan (JSON).

Exit codes: 0 with a plan (a ``time_limit`` plan included, with a warning), 1 when no plan came
back (``infeasible`` prints the smallest feasible budget; ``error`` prints the solver's message),
2 on bad input (one line, from :func:`allocator.cli.main`).
"""

from __future__ import annotations

import argparse
import sys

from allocator.cli._common import add_budget_arguments, add_for_argument, budget_from_args, console

HELP = "solve a cost table under a budget and write the bit plan (JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="cost table (.parquet/.csv/.json)")
    add_budget_arguments(p)
    p.add_argument("--solver", default=None,
                   help="solver name (default: mckp); see solvers.SOLVERS")
    p.add_argument("--seed", type=int, default=None, help="seed for solvers that draw randomly")
    add_for_argument(p, "solve over")
    p.add_argument("-o", "--output", required=True, help="write the plan here (.json)")


def _fmt(x: float | None, spec: str = ".6g") -> str:
    return "n/a" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> int:
    import solvers
    from allocator.core.result import SolveStatus
    from allocator.core.table import CostTable
    from allocator.export.palettes import table_for

    table = table_for(CostTable.load(args.table), getattr(args, "consumer", None))
    budget = budget_from_args(args)
    solver = solvers.get_solver(args.solver)
    result = solver.solve(table, budget, seed=args.seed)
    out = console()

    def say(text: str) -> None:
        out.print(text, soft_wrap=True)  # one line per fact, whatever the terminal width

    say(f"status:    {result.status}  ({result.solver})")
    if result.status is SolveStatus.INFEASIBLE:
        key, value = budget.primary
        say(f"budget:    {key}={value:.6g} — {result.message}")
        if result.min_feasible is not None:
            flag = "--bpw" if key == "bpw" else "--size-bytes"
            say(f"smallest feasible budget: {flag} {result.min_feasible:.6g}")
        return 1
    if result.plan is None:
        label = "error" if result.status is SolveStatus.ERROR else str(result.status)
        print(f"bitalloc solve: {label}: {result.message}", file=sys.stderr)  # noqa: T201
        return 1
    s = result.plan.summary
    say(f"objective: {_fmt(result.objective)}  (predicted cost; bound {_fmt(result.bound)})")
    say(f"gap:       {_fmt(result.gap, '.3g')}")
    say(f"bpw:       {s.bpw:.4f}  ({s.size_bits / 8 / 2**20:,.2f} MiB, {s.params:,} weights)")
    say(f"time:      {result.seconds:.3f} s")
    if table.metadata.get("consumer"):
        say(f"for:       {table.metadata['consumer']} (export --to {table.metadata['consumer']} "
            "needs no --lossy)")
    if result.status is SolveStatus.TIME_LIMIT:
        say(f"warning:   stopped by the time limit; the plan is not certified "
            f"({result.message})")
    say(f"plan ->    {result.plan.save(args.output)}")
    return 0
