"""Benchmark: per-unit GPTQ from full-precision Hessians against Hessians as the uniform plan is
applied, each against the backend's block-by-block GPTQ (docs/quantizer.md).

``run --method gptq`` chooses plans with a per-unit GPTQ quantizer (each unit alone, cached) and
hands them to the backend, which quantizes block after block on the outputs of the blocks
already quantized. This script measures how far the per-unit stand-in is from the applied
result, for the uniform plan that fits and the cost-table optimum, with

* ``full``: Hessians of the full-precision model (``gptq_quantizer``, ``run`` before), and
* ``applied``: Hessians recorded while the uniform plan is applied
  (``gptq_quantizer_as_applied``, what :func:`allocator.jobs.pipeline.run_quantizer` builds now).

Each plan is measured three ways on the validation share and on held-out texts: its weights
from the ``full`` quantizer, from the ``applied`` one, and applied by the backend. Everything is
``run``'s own stages (data, fit / validation split, units, gauss-newton table, solver).

    PYTHONPATH=. python benchmarks/gptq_inputs.py --model smollm2 --bpw 3.25 --evals 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.core.budget import Budget
    from allocator.core.formats import parse_format
    from allocator.core.units import unit_weight
    from allocator.jobs.pipeline import RunConfig, estimate_table, run_quantizer, uniform_plans
    from allocator.model.data import user_data_for
    from allocator.model.data.split import split_calibration
    from allocator.model.loading import load_model
    from allocator.model.output_store import TensorStash
    from allocator.model.quant import gptq_quantizer
    from allocator.model.unit_select import select_units
    from solvers import solve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--bpw", type=float, default=3.25)
    ap.add_argument("--evals", type=int, default=32, help="held-out texts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    cfg = RunConfig(model=args.model, bpw=args.bpw, method="gptq", out=None)
    spec = cfg.estimate
    loaded = load_model(args.model)
    model = loaded.model.eval()
    kind = str(loaded.kind)
    calib = user_data_for(loaded, "calibration", spec.samples, seq_len=spec.seq_len,
                          batch_size=spec.batch_size, seed=spec.seed)
    held = list(user_data_for(loaded, "evaluation", args.evals, seq_len=spec.seq_len,
                              batch_size=spec.batch_size, seed=spec.seed))
    shares = split_calibration(calib, cfg.validation_share)
    fit, val = list(shares.fit), list(shares.validation)
    from allocator.core.units import discover_units

    units = list(select_units(loaded, discover_units(model), batch=fit[0]).units)
    state = TensorStash(model.state_dict())
    data = {"validation": val, "held-out": held}
    refs = {k: reference_outputs(model, v, kind=kind) for k, v in data.items()}
    quantizers = {"full": gptq_quantizer(model, units, fit, kind=kind),
                  "applied": run_quantizer(loaded, cfg, shares.fit, units, say)}
    budget = Budget(bpw=args.bpw)
    plans: dict[str, Any] = {}
    for name, q in quantizers.items():
        table = estimate_table(loaded, shares.fit, cfg, units, q)
        say(f"{name}-Hessian table")
        plans[f"optimum ({name} table)"] = solve(table, budget).plan
        plans.setdefault("uniform", uniform_plans(table, budget.size_cap_bits(table.total_params))[0])
    by_name = {u.name: u for u in units}

    def measured() -> dict[str, dict[str, float]]:
        return {k: {m: float(v) for m, v in evaluate(model, data[k], refs[k]).metrics.items()
                    if m in ("kl", "perplexity")} for k in data}

    def per_unit(choice: Mapping[str, str], q: Any) -> None:
        with torch.no_grad():
            for name, opt in choice.items():
                w = unit_weight(model, by_name[name])  # at full precision: restored before each plan
                w.copy_(q.quantize(by_name[name], w.detach().clone(), parse_format(opt)))

    rows: dict[str, Any] = {}
    for label, plan in plans.items():
        if plan is None:
            continue
        for name, q in quantizers.items():
            per_unit(plan.choice, q)
            rows[f"{label} | per-unit, {name} Hessians"] = measured()
            state.restore(model)
        apply_plan(model, plan, method="gptq", calibration=fit, units=units)
        rows[f"{label} | applied"] = measured()
        state.restore(model)
        say(f"{label} measured")
    print("| plan, weights as | validation KL (ppl) | held-out KL (ppl) |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | " + " | ".join(f"{r[s]['kl']:.4g} ({r[s]['perplexity']:.4g})" for s in data) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
