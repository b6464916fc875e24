"""Benchmark: output-consistent vs task-loss curvature (MiniLM / tiny Llama) against ``measured``.

Run:  PYTHONPATH=. python benchmarks/curvature.py [--model minilm|tiny-llama] [--samples 16]
      [--seq-len 128] [--quick]

Every estimator scores the model's Linear units × int2/3/4/8-g128-asym on the same calibration
batches. The reference is ``measured`` (CalibTIP-style: quantize one unit, measure the output
distortion against full precision on the same batches: mean 1 − cos of the embedding for the
encoder, token-mean KL for the causal LM), i.e. the quantity the curvature estimators predict.
Printed per estimator: wall time, median relative ``cost_std``, and the Spearman rank
correlation of its unit costs with the measured ones at every option; for the task-loss Hessian
also how many traces came out negative / within 2 SEM of 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, without PYTHONPATH

OPTIONS = "int2-g128-asym,int3-g128-asym,int4-g128-asym,int8-g128-asym"
#: (label, estimator, params): the new defaults first, then the task-loss paths they replace.
RUNS = [
    ("gauss-newton", "gauss-newton", {"probes": 2}),
    ("fisher (model)", "fisher", {}),
    ("hessian-trace (gauss-newton)", "hessian-trace", {}),
    ("fisher (empirical, task loss)", "fisher", {"target": "empirical"}),
    ("hessian-trace (hessian, task loss)", "hessian-trace", {"curvature": "hessian", "max_probes": 8}),
]


def main() -> None:
    from scipy.stats import spearmanr

    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units
    from allocator.model.data import CalibrationData
    from allocator.model.loading import load_model
    from sensitivity import EstimateContext, get_estimator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="minilm (encoder) or tiny-llama (causal LM)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="first two blocks only")
    args = ap.parse_args()

    lm = load_model(args.model)
    cal = CalibrationData.from_corpus(lm.tokenizer, split="calibration", n_samples=args.samples,
                                      seq_len=args.seq_len, batch_size=8)
    units = discover_units(lm.model, include=r"layers?\.[01]\." if args.quick else None)
    ctx = EstimateContext(batches=list(cal), units=units, options=parse_options(OPTIONS),
                          model_kind=str(lm.kind), progress=False)
    print(f"{lm.name} ({lm.kind}): {len(units)} units × {len(ctx.options)} options, "
          f"{args.samples} samples × {args.seq_len} tokens")
    t = time.perf_counter()
    ref = get_estimator("measured").estimate(lm.model, ctx)
    print(f"{'measured (reference)':34s} {time.perf_counter() - t:7.1f} s")
    ref_cost = ref.df.pivot(index="unit", columns="option", values="cost")
    print(f"{'estimator':34s} {'time':>9s} {'rel std':>8s}  Spearman ρ vs measured per option")
    for label, name, params in RUNS:
        t = time.perf_counter()
        table = get_estimator(name, **params).estimate(lm.model, ctx)
        seconds = time.perf_counter() - t
        cost = table.df.pivot(index="unit", columns="option", values="cost")
        std = table.df.pivot(index="unit", columns="option", values="cost_std")
        rel = float(np.nanmedian((std / cost).to_numpy()))
        rho = [spearmanr(cost[c], ref_cost[c]).statistic for c in ref_cost.columns]
        extra = ""
        if "negative_traces" in table.metadata:
            extra = (f"  ({len(table.metadata['negative_traces'])} negative, "
                     f"{len(table.metadata['noisy_traces'])} noisy traces)")
        print(f"{label:34s} {seconds:7.1f} s {rel:8.3f}  {np.round(rho, 3).tolist()}{extra}")


if __name__ == "__main__":
    main()
