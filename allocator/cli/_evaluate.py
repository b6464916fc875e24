"""``bitalloc evaluate``: quality of a plan on held-out text vs the full-precision model."""

from __future__ import annotations

import argparse

from allocator.cli._common import add_device_argument, console, device_from_args
from allocator.cli._run import add_data_arguments
from sensitivity import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

HELP = "evaluate a plan (or plans) on held-out data: perplexity/KL, embedding cosine, retrieval"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory (or minilm / tiny-llama)")
    p.add_argument("plans", nargs="+", help="plan.json file(s)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="quantizer (default rtn)")
    p.add_argument("--samples", type=int, default=64, help="held-out samples (default 64)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"GPTQ calibration samples (default {DEFAULT_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--cache-dir", help="keep full-precision reference outputs here")
    add_data_arguments(p)
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.core.plan import BitPlan
    from allocator.model.data import user_data_for
    from allocator.model.loading import load_model

    device = device_from_args(args)
    plans = [(p, BitPlan.load(p)) for p in args.plans]
    loaded = load_model(args.model, device=device)
    files = {"data": args.data, "eval_data": args.eval_data, "seq_len": args.seq_len,
             "batch_size": 8}
    held_data = user_data_for(loaded, "evaluation", args.samples, **files)
    held = list(held_data.to(device))  # batches where the model is
    calib = None
    if args.method == "gptq":
        calib_data = user_data_for(loaded, "calibration", args.calib_samples, **files)
        calib = list(calib_data.to(device))
        console().print(f"calibration: {calib_data.metadata()['source']}")
    ref = reference_outputs(loaded.model, held, kind=loaded.kind, model_fingerprint=loaded.fingerprint,
                            cache_dir=args.cache_dir)
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    table = Table(title=f"{loaded.name}: held-out evaluation ({len(held)} batches of "
                  f"{held_data.metadata()['source']}, {args.method}, {device})")
    rows = []
    for path, plan in plans:
        loaded.model.load_state_dict(state)
        apply_plan(loaded.model, plan, method=args.method, calibration=calib)
        rows.append((path, plan, evaluate(loaded.model, held, ref)))
    metrics = list(rows[0][2].metrics)
    for col in ("plan", "bpw", *metrics):
        table.add_column(col, justify="left" if col == "plan" else "right")
    table.caption = "value [95 % bootstrap interval over the held-out samples]"
    for path, plan, rep in rows:
        ci = rep.intervals()
        # Text: an interval such as [nan, nan] is no rich markup tag
        table.add_row(str(path), f"{plan.summary.bpw:.4f}", *(Text(
            f"{rep.metrics[m]:.4g}" + (f" [{ci[m].lo:.4g}, {ci[m].hi:.4g}]" if m in ci else ""))
            for m in metrics))
    console().print(table)
    return 0
