"""Refinement judged on a validation share vs on the data it was fitted on (docs/refine.md).

For one model and budget it runs ``bitalloc run`` twice in this process — ``--validation-share 0``
(the calibration data measures the moves and judges them: the behaviour before the split) and
``--validation-share S`` (moves measured on the fit share, candidates and moves judged on the
validation share, the estimate on the fit share) — and reports, for each, the held-out error of
the handed-out plan over the uniform plan that fits (RTN, same size class), on the run's own
held-out data and on text of another domain (``--other-text``; default: the licence texts of
Debian's ``base-files`` package in /usr/share/common-licenses, legal prose the docstring corpus
lacks). Both runs and the uniform baseline are measured in this run.

    PYTHONPATH=. nice python benchmarks/refine_validation.py --model minilm --bpw 3.25
    # or only evaluate two finished runs (their plan.json, table.parquet, results.json):
    PYTHONPATH=. python benchmarks/refine_validation.py --model minilm --bpw 3.25 \\
        --from /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

LICENCES = ("GPL-3", "GFDL-1.3", "MPL-2.0", "Apache-2.0", "LGPL-2.1", "Artistic", "CC0-1.0")
LICENCE_DIR = Path("/usr/share/common-licenses")


def licence_text(path: Path, *, min_words: int = 12) -> Path:
    """The licence texts' paragraphs of ≥ ``min_words`` words, one per blank-line block."""
    from allocator.model.data import read_text_file

    paras: list[str] = []
    for name in LICENCES:
        f = LICENCE_DIR / name
        if f.is_file():
            src = path.with_suffix(f".{name}.txt")
            src.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
            paras += [p for p in read_text_file(src) if len(p.split()) >= min_words]
    if not paras:
        raise SystemExit(f"no licence texts under {LICENCE_DIR}; pass --other-text FILE")
    path.write_text("\n\n".join(paras), encoding="utf-8")
    return path


def run_once(model: str, bpw: float, share: float, samples: int, out: Path) -> Path:
    from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec

    spec = run_spec(samples=samples, progress=False)
    run_pipeline(RunConfig(model=model, bpw=bpw, estimate=spec, validation_share=share, out=out))
    return out


def other_domain(model: str, bpw: float, dirs: list[Path], text: Path, n: int) -> list[dict[str, Any]]:
    """Held-out error of each run's plan and of the uniform plan that fits, on ``text``."""
    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.core.budget import Budget
    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable
    from allocator.core.units import discover_units
    from allocator.jobs.pipeline import uniform_plans
    from allocator.model.data import user_data_for
    from allocator.model.loading import load_model
    from allocator.model.output_store import TensorStash

    loaded = load_model(model)
    net = loaded.model.eval()
    ev = user_data_for(loaded, "evaluation", n, eval_data=str(text))
    ref = reference_outputs(net, list(ev), kind=loaded.kind, model_fingerprint=loaded.fingerprint)
    state = TensorStash(net.state_dict())
    units = discover_units(net)

    def error(plan: Any) -> float:
        state.restore(net)
        apply_plan(net, plan, method="rtn", units=units)
        got = evaluate(net, list(ev), ref).error
        state.restore(net)
        return float(got)

    rows = []
    for d in dirs:
        table = CostTable.load(d / "table.parquet")
        below, _ = uniform_plans(table, Budget(bpw=bpw).size_cap_bits(table.total_params))
        if below is None:
            raise SystemExit(f"no uniform plan fits {bpw} bpw")
        mine, uni = error(BitPlan.load(d / "plan.json")), error(below)
        rows.append({"run": str(d), "plan": mine, "uniform": uni, "ratio": mine / uni,
                     "samples": ev.n_samples})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--bpw", type=float, default=3.25)
    p.add_argument("--share", type=float, default=0.25, help="validation share of the second run")
    p.add_argument("--samples", type=int, default=32, help="calibration samples of both runs")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--other-text", type=Path, help="other-domain text (default: licence texts)")
    p.add_argument("--from", dest="dirs", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                   help="evaluate two finished runs (share 0, share S) instead of running them")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bitalloc-refine-validation-"))
    dirs = args.dirs or [run_once(args.model, args.bpw, s, args.samples, work / f"share-{s:g}")
                         for s in (0.0, args.share)]
    text = args.other_text or licence_text(work / "other-domain.txt")
    own = [json.loads((d / "results.json").read_text()) for d in dirs]
    other = other_domain(args.model, args.bpw, dirs, text, args.eval_samples)
    print(f"{args.model} at {args.bpw:g} bpw, handed-out plan / uniform plan that fits "
          f"(held-out error, RTN); other-domain text: {text}")
    print(f"{'run':>34} {'own split':>10} {'other domain':>13}  selection (start, rounds accepted)")
    out = []
    for d, res, oth in zip(dirs, own, other, strict=True):
        sel = res.get("selection") or {}
        acc = sum(bool(r["accepted"]) for r in sel.get("rounds", []))
        ratio = res.get("error_ratio")
        own_ratio = float(ratio) if ratio is not None else float("nan")
        print(f"{str(d)[-34:]:>34} {own_ratio:10.4f} {oth['ratio']:13.4f}  "
              f"{sel.get('start')}, {acc}/{len(sel.get('rounds', []))}")
        out.append({"run": str(d), "own_ratio": own_ratio, "other": oth, "selection": sel})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
