"""Does choosing a ``--method gptq`` plan with GPTQ costs beat choosing it with RTN costs?

``bitalloc run MODEL --method gptq --bpw B`` twice, both applied and evaluated with the backend's
GPTQ on the same held-out data:

* ``gptq-chosen``: costs, candidate choice and refinement with the GPTQ quantizer (today's
  ``run --method gptq``, docs/quantizer.md);
* ``rtn-chosen``: the same with the RTN quantizer (what ``--method gptq`` did before: plans
  chosen with RTN, only applied with GPTQ);

and the uniform plan that fits the budget, GPTQ-applied (``u≤``; at 3.25 bpw it is int3-g128-asym,
equal size). Prints held-out KL (and perplexity) of each.

    PYTHONPATH=. python benchmarks/quantizer_choice.py --model tiny-llama --bpw 3.25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(model: str, bpw: float, choose_with: str, args: argparse.Namespace) -> dict[str, Any]:
    from allocator.jobs import pipeline
    from allocator.model.quant import RtnQuantizer

    cfg = pipeline.RunConfig(model=model, bpw=bpw, method="gptq",
                             estimate=pipeline.run_spec(args.estimator, samples=args.samples,
                                                        progress=False),
                             eval_samples=args.eval_samples, refine_time_limit=args.refine_time, out=None)
    build = pipeline._quantizer
    if choose_with == "rtn":  # the old behaviour: every stage before apply with RTN
        pipeline._quantizer = lambda *a, **k: RtnQuantizer()  # type: ignore[assignment]
    t0 = time.perf_counter()
    try:
        run = pipeline.run_pipeline(cfg)
    finally:
        pipeline._quantizer = build  # type: ignore[assignment]
    rows = {r.label: {"bpw": round(r.bpw, 4), "error": r.report.error, "metric": r.report.error_metric,
                      **{k: v for k, v in r.report.metrics.items() if k == "perplexity"}}
            for r in run.rows}
    return {"choose_with": choose_with, "quantizer": run.table.metadata.get("quantizer"),
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
            "fp": dict(run.fp_metrics)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--bpw", type=float, default=3.25)
    ap.add_argument("--estimator", default="gauss-newton")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--refine-time", type=float, default=300.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = [one(args.model, args.bpw, w, args) for w in ("gptq", "rtn")]
    for r in out:
        print(f"chosen with {r['choose_with']} ({r['seconds']} s):")
        for label, row in r["rows"].items():
            print(f"  {label:<40} {row['bpw']:.4f} bpw  {row['metric']}={row['error']:.5g}"
                  + (f"  ppl={row['perplexity']:.4g}" if "perplexity" in row else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
