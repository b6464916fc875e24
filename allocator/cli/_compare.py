"""``bitalloc compare``: rank agreement (Spearman, Kendall) between cost tables per unit."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from allocator.cli._common import console
from allocator.core.atomic import atomic_path

HELP = "rank agreement (Spearman / Kendall) of unit costs between cost tables"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tables", nargs="+", metavar="TABLE", help="two or more cost tables")
    p.add_argument("--option", help="option whose costs rank the units (default: the "
                   "lowest-bit option every table has)")
    p.add_argument("--csv", metavar="FILE", help="also write the pairs as CSV ('-' = stdout only)")


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from allocator.core.compare import agreement_frame, compare_tables, table_label
    from allocator.core.errors import InvalidParameterError
    from allocator.core.table import CostTable

    if len(args.tables) < 2:
        raise InvalidParameterError(f"compare needs at least 2 tables, got {len(args.tables)}")
    tables = [CostTable.load(p) for p in args.tables]
    labels = [table_label(t, Path(p).stem) for t, p in zip(tables, args.tables, strict=True)]
    if len(set(labels)) < len(labels):  # same estimator twice: tell them apart by file
        labels = [f"{lab} ({Path(p).name})" for lab, p in zip(labels, args.tables, strict=True)]
    rows = compare_tables(tables, labels, option=args.option)
    frame = agreement_frame(rows)
    if args.csv == "-":
        frame.to_csv(sys.stdout, index=False)
        return 0
    shown = Table(title=f"rank agreement of unit costs at option {rows[0].option}")
    for col in ("A", "B", "units", "Spearman ρ", "p", "Kendall τ", "p "):
        shown.add_column(col, justify="left" if col in ("A", "B") else "right")
    for r in rows:
        shown.add_row(r.a, r.b, str(r.units), _fmt(r.spearman), f"{r.spearman_p:.2g}",
                      _fmt(r.kendall), f"{r.kendall_p:.2g}")
    out = console()
    if not out.is_terminal:  # logs and pipes: full estimator names instead of 80 columns
        out.width = max(130, 2 * max(len(lab) for lab in labels) + 70)
    out.print(shown)
    if args.csv:
        with atomic_path(args.csv) as tmp:
            frame.to_csv(tmp, index=False)
        out.print(f"pairs -> {args.csv}")
    return 0
