"""``bitalloc frontier``: the size-vs-cost Pareto frontier of a cost table."""

from __future__ import annotations

import argparse

import numpy as np

from allocator.cli._common import add_for_argument, console

HELP = "compute the size-vs-cost Pareto frontier (convex hull sweep + exact points)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="cost table (.parquet/.csv/.json)")
    p.add_argument("-o", "--output", help="write every frontier point to this CSV")
    p.add_argument("--plot", help="write a plot (PNG/SVG/PDF) of cost vs bits per weight")
    p.add_argument("--html", help="write an interactive plot (self-contained plotly HTML)")
    p.add_argument("--band-sigma", type=float, default=2.0, metavar="K",
                   help="band of ±K·σ around the predicted cost when the table has cost_std "
                        "(default 2; 0 = no band)")
    p.add_argument("--measured", metavar="CSV",
                   help="overlay measured points from a CSV with columns bpw,error[,label]")
    p.add_argument("--bpw", type=float, nargs="+", default=[],
                   help="also solve the exact MCKP at these bits per weight")
    p.add_argument("--rows", type=int, default=12, help="rows to print (default 12)")
    add_for_argument(p, "sweep")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from allocator.core.budget import Budget
    from allocator.core.errors import InvalidParameterError
    from allocator.core.table import CostTable
    from solvers import frontier, load_measured

    if args.measured and not (args.plot or args.html):
        raise InvalidParameterError("--measured is drawn on a plot; add --plot PNG or --html HTML")
    # Bad plot inputs fail before the (possibly long) sweep.
    measured = load_measured(args.measured) if args.measured else None
    if not (np.isfinite(args.band_sigma) and args.band_sigma >= 0):
        raise InvalidParameterError(
            f"--band-sigma must be finite and ≥ 0, got {args.band_sigma}; 0 draws no band")
    from allocator.export.palettes import table_for

    table = table_for(CostTable.load(args.table), getattr(args, "consumer", None))
    f = frontier(table, budgets=[Budget(bpw=b) for b in args.bpw])
    out = console()
    shown = Table(title=f"Pareto frontier: {len(f)} points "
                  f"({int((f.kind == 'exact').sum())} exact)")
    std = f.cost_std
    sigma_col = ("σ",) if std is not None else ()
    cols = ("#", "bpw", "size MiB", "predicted cost", *sigma_col, "kind")
    for col in cols:
        shown.add_column(col, justify="right" if col != "kind" else "left")
    pick = np.unique(np.concatenate([
        np.linspace(0, len(f) - 1, min(args.rows, len(f))).round().astype(int),
        np.flatnonzero(f.kind == "exact")]))
    for i in pick:
        sigma = (f"{std[i]:.3g}",) if std is not None else ()
        shown.add_row(str(i), f"{f.bpw[i]:.4f}", f"{f.size_bits[i] / 8 / 2**20:,.1f}",
                      f"{f.cost[i]:.6g}", *sigma, str(f.kind[i]))
    out.print(shown)
    if std is None and (args.plot or args.html):
        out.print("no cost_std column in the table: the plot has no uncertainty band")
    if args.output:
        out.print(f"points -> {f.save_csv(args.output)}")
    if args.plot:
        out.print(f"plot -> {f.plot(args.plot, measured=measured, band_sigma=args.band_sigma)}")
    if args.html:
        page = f.plot_interactive(args.html, measured=measured, band_sigma=args.band_sigma)
        out.print(f"interactive plot -> {page}")
    return 0
