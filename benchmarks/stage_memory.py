"""Benchmark: the peak RSS of ``bitalloc run``'s estimate stage alone, per delta budget.

Runs ``run``'s own stages up to the estimate (``allocator.jobs.pipeline``: load, data, the fit
share, units, quantizer, then :func:`~allocator.jobs.pipeline.estimate_table`) with the peak mark
reset just before the estimate (``/proc/self/clear_refs``), once per ``--budgets`` value, each in
a fresh process, and prints the estimate's peak and seconds next to the default budget's, with
the largest relative difference of the tables from the default's (the budget trades memory for
passes or row pieces; the table must not change). Timings are meaningful only on a quiet machine.

    PYTHONPATH=. python benchmarks/stage_memory.py --model smollm2 --budgets 384 512
    PYTHONPATH=. python benchmarks/stage_memory.py --model smollm2 --budgets 256 --param correlations=unit

``--param KEY=VALUE`` sets an estimator parameter of every run (read as ``bitalloc estimate
--param`` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(model: str, budget: float, out: Path, params: dict[str, object] | None = None) -> dict[str, float]:
    """The estimate stage at ``budget`` MiB in this process; the table is saved to ``out``."""
    from allocator.core.rss import peak_rss_mb, reset_peak_rss
    from allocator.core.units import discover_units
    from allocator.jobs.pipeline import RunConfig, estimate_table
    from allocator.model.data import user_data_for
    from allocator.model.data.split import split_calibration
    from allocator.model.loading import load_model
    from allocator.model.quant import build_quantizer
    from allocator.model.unit_select import select_units

    cfg = RunConfig(model=model, bpw=3.25, out=None)
    spec = dataclasses.replace(cfg.estimate, progress=False,
                               params={**dict(cfg.estimate.params or {}), **(params or {}),
                                       "delta_budget_mb": budget})
    cfg = dataclasses.replace(cfg, estimate=spec)
    loaded = load_model(model)  # as run's stages do: the same data, fit share, units, quantizer
    loaded.model.eval()
    calib = user_data_for(loaded, "calibration", spec.samples, seq_len=spec.seq_len,
                          batch_size=spec.batch_size, seed=spec.seed, data=spec.data)
    fit = split_calibration(calib, cfg.validation_share).fit if cfg.validation_share else calib
    found = discover_units(loaded.model, kinds=spec.kinds, group_columns=spec.groups)
    units = list(select_units(loaded, found, include=spec.include or (), exclude=spec.exclude or (),
                              batch=next(iter(calib))).units)
    quantizer = build_quantizer(cfg.method, loaded.model, units, list(calib), kind=str(loaded.kind))
    before = peak_rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    table = estimate_table(loaded, fit, cfg, units, quantizer)
    seconds = time.perf_counter() - t0
    table.save(out)
    return {"budget_mb": budget, "peak_mb": peak_rss_mb(), "before_mb": before, "seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    from sensitivity import DEFAULT_DELTA_BUDGET_MB

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budgets", nargs="+", type=float, default=[DEFAULT_DELTA_BUDGET_MB, 512.0])
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="an estimator parameter for every run (repeatable)")
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # the child process's budget
    ap.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        from sensitivity import parse_estimator_params

        print(json.dumps(one(args.model, args.one, args.table, parse_estimator_params(args.param))))
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.budgets:
            path = Path(tmp) / f"table-{b:g}.parquet"
            extra = [f"--param={p}" for p in args.param]
            done = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(b),
                                   "--table", str(path), *extra], check=True, capture_output=True, text=True)
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "table": str(path)})
        _diffs(rows, DEFAULT_DELTA_BUDGET_MB)
    print(f"| delta budget MiB | estimate peak MiB | before the estimate MiB | seconds | "
          f"max rel. table difference vs {DEFAULT_DELTA_BUDGET_MB:g} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget_mb']:g} | {r['peak_mb']:.0f} | {r['before_mb']:.0f} | {r['seconds']:.0f} | "
              f"{r.get('max_rel_diff', float('nan')):.2g} |")
    return rows


def _diffs(rows: list[dict], default: float) -> None:
    """Each table's largest relative cost difference from the default budget's table."""
    import numpy as np

    from allocator.core.table import CostTable

    base = next((r for r in rows if r["budget_mb"] == default), None)
    if base is None:
        return
    ref = CostTable.load(base["table"]).df.sort_values(["unit", "option"])["cost"].to_numpy()
    for r in rows:
        got = CostTable.load(r["table"]).df.sort_values(["unit", "option"])["cost"].to_numpy()
        r["max_rel_diff"] = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)))


if __name__ == "__main__":
    main()
