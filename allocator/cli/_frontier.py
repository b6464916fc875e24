"""``bitalloc frontier``: the size-vs-cost Pareto frontier of a cost table."""

from __future__ import annotations

import argparse

import numpy as np

from allocator.cli._common import console

HELP = "compute the size-vs-cost Pareto frontier (convex hull sweep + exact points)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="cost table (.parquet/.csv/.json)")
    p.add_argument("-o", "--output", help="write every frontier point to this CSV")
    p.add_argument("--plot", help="write a plot (PNG/SVG/PDF) of cost vs bits per weight")
    p.add_argument("--bpw", type=float, nargs="+", default=[],
                   help="also solve the exact MCKP at these bits per weight")
    p.add_argument("--rows", type=int, default=12, help="rows to print (default 12)")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from allocator.budget import Budget
    from allocator.table import CostTable
    from solvers import frontier

    table = CostTable.load(args.table)
    f = frontier(table, budgets=[Budget(bpw=b) for b in args.bpw])
    out = console()
    shown = Table(title=f"Pareto frontier: {len(f)} points "
                  f"({int((f.kind == 'exact').sum())} exact)")
    for col in ("#", "bpw", "size MiB", "predicted cost", "kind"):
        shown.add_column(col, justify="right" if col != "kind" else "left")
    pick = np.unique(np.concatenate([
        np.linspace(0, len(f) - 1, min(args.rows, len(f))).round().astype(int),
        np.flatnonzero(f.kind == "exact")]))
    for i in pick:
        shown.add_row(str(i), f"{f.bpw[i]:.4f}", f"{f.size_bits[i] / 8 / 2**20:,.1f}",
                      f"{f.cost[i]:.6g}", str(f.kind[i]))
    out.print(shown)
    if args.output:
        out.print(f"points -> {f.save_csv(args.output)}")
    if args.plot:
        out.print(f"plot -> {f.plot(args.plot)}")
    return 0
