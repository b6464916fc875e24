"""``bitalloc synth``: write a seeded synthetic cost table (real layer shapes, 4^-b costs)."""

from __future__ import annotations

import argparse

from allocator.cli._common import console

HELP = "write a synthetic cost table with real transformer layer shapes (for solvers/benchmarks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from allocator.core.synth import MODEL_SHAPES

    p.add_argument("-n", "--units", type=int, required=True, help="number of units (projections)")
    p.add_argument("--options", help="comma-separated option labels or ranges "
                   "('int2..8-g128-asym,fp16'); default: int2..int8 g128 asym")
    p.add_argument("--n-options", type=int, default=7,
                   help="with no --options: int2.. up to 7 options, 8 adds fp16 (default 7)")
    p.add_argument("--model", default="llama-7b", choices=sorted(MODEL_SHAPES),
                   help="layer shapes to cycle through (default llama-7b)")
    p.add_argument("--ties", action="store_true", help="tie q/k/v and gate/up of each layer")
    p.add_argument("--resources", action="store_true",
                   help="add a 'bops' column (params × weight bits × activation bits)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-sensitivity spread (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="table.parquet",
                   help="output file (.parquet, .csv or .json; default table.parquet)")


def run(args: argparse.Namespace) -> int:
    from allocator.core.formats import parse_options
    from allocator.core.synth import synth_table

    options = parse_options(args.options) if args.options else None
    table = synth_table(n_units=args.units, n_options=args.n_options, seed=args.seed,
                        model=args.model, options=options, ties=args.ties,
                        resources=args.resources, sigma=args.sigma)
    path = table.save(args.output)
    console().print(f"{table.n_units} units × {len(table.options)} options, "
                    f"{table.total_params:,} params -> {path}")
    return 0
