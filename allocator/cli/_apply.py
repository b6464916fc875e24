"""``bitalloc apply``: fake-quantize a model as a plan says, verify it, optionally save it."""

from __future__ import annotations

import argparse

from allocator.cli._common import add_device_argument, console, device_from_args
from allocator.cli._run import add_data_arguments
from sensitivity import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

HELP = "apply a bit plan to a model (RTN, GPTQ or ggml fake quantization), verify, save"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory (or minilm / tiny-llama)")
    p.add_argument("plan", help="plan.json")
    p.add_argument("--method", choices=("rtn", "gptq", "ggml"), default="rtn",
                   help="quantizer (default rtn; ggml: llama.cpp's quantizers for GGUF options, "
                   "with an imatrix from the calibration data)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"GPTQ / ggml-imatrix calibration samples (default {DEFAULT_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--group-columns", type=int,
                   help="column-group width of [g=i] units (default: inferred from the plan)")
    add_data_arguments(p, calibration_only=True)
    add_device_argument(p)
    p.add_argument("--sequential", action="store_true",
                   help="GPTQ one transformer block in memory at a time, reading the weights from "
                        "the model's safetensors; needs --method gptq and -o (docs/sequential.md)")
    p.add_argument("-o", "--output",
                   help="save the fake-quantized model here in its own format: a "
                        "sentence-transformers folder stays one (modules.json, pooling, normalize, "
                        "configs), any other model is saved with save_pretrained")


def run(args: argparse.Namespace) -> int:
    from allocator.backend import apply_plan, verify
    from allocator.core.errors import InvalidParameterError
    from allocator.core.plan import BitPlan
    from allocator.core.units import discover_units
    from allocator.model.data import user_data_for
    from allocator.model.loading import load_model

    if args.data is not None and args.method == "rtn":
        raise InvalidParameterError("--data calibrates GPTQ and ggml only; add --method gptq/ggml or "
                                    "drop --data (RTN needs no data)")
    device = device_from_args(args)
    if args.sequential:
        return _run_sequential(args, device)
    plan = BitPlan.load(args.plan)
    loaded = load_model(args.model, device=device)
    units = discover_units(loaded.model, group_columns=args.group_columns) if args.group_columns else None
    calib = None
    if args.method != "rtn":
        calib_data = user_data_for(loaded, "calibration", args.samples, data=args.data,
                                   holdout=False, seq_len=args.seq_len, batch_size=8)
        calib = list(calib_data.to(device))  # the forwards run where the model is
    out = console()
    if calib is not None:
        out.print(f"calibration: {calib_data.metadata()['source']} ({len(calib)} batches)")
    report = apply_plan(loaded.model, plan, method=args.method, calibration=calib, units=units,
                        progress=True)
    check = verify(loaded.model, plan, units=units)
    out.print(f"applied {len(report.units)} units ({args.method}, {device}) in {report.seconds:.1f}s: "
              f"{report.bpw:.4f} bpw, {report.size_bits / 8 / 2**20:,.2f} MiB")
    if check.ok:
        out.print(f"verify: ok ({len(check.units)} units, {check.bpw_read:.4f} bpw)")
    else:
        out.print(f"[red]verify: {len(check.mismatches)} mismatch(es)[/red]")
        for m in check.mismatches[:20]:
            out.print(f"  {m}")
    if args.output:
        from allocator.model.save import is_sentence_transformers, save_model

        where = save_model(loaded, args.output)
        kind = "sentence-transformers" if is_sentence_transformers(loaded.path) else "transformers"
        out.print(f"model ({kind} folder) -> {where}")
    return 0 if check.ok else 1


def _run_sequential(args: argparse.Namespace, device: str) -> int:
    """``--sequential``: block-by-block GPTQ written to ``-o`` as a sharded checkpoint; the
    whole-model ``verify`` is skipped (it would load every block at once)."""
    from allocator.backend import apply_plan_sequential
    from allocator.core.errors import InvalidParameterError
    from allocator.core.plan import BitPlan
    from allocator.core.units import discover_units
    from allocator.model.data import user_data_for
    from allocator.model.sequential import SequentialModel

    if args.method != "gptq" or not args.output:
        raise InvalidParameterError("--sequential runs GPTQ and writes its result block by block; "
                                    "add --method gptq and -o DIR")
    plan = BitPlan.load(args.plan)
    seq = SequentialModel(args.model, device=device)
    units = discover_units(seq.model, group_columns=args.group_columns) if args.group_columns else None
    # a SequentialModel carries the config, kind and tokenizer data_for reads
    calib_data = user_data_for(seq, "calibration", args.samples, data=args.data, holdout=False,
                               seq_len=args.seq_len, batch_size=8)
    out = console()
    out.print(f"calibration: {calib_data.metadata()['source']} ({len(calib_data.batches)} batches)")
    result = apply_plan_sequential(seq, plan, calibration=list(calib_data.to(device)), units=units,
                                   save_dir=args.output)
    report = result.report
    out.print(f"applied {len(report.units)} units (gptq, sequential, {device}) in {report.seconds:.1f}s: "
              f"{report.bpw:.4f} bpw, {report.size_bits / 8 / 2**20:,.2f} MiB; peak "
              f"{result.peak_params:,} parameters in memory (non-block {result.nonblock_params:,} + "
              f"largest block {result.max_block_params:,})")
    out.print(f"model (transformers sharded safetensors) -> {result.save_dir}")
    return 0
