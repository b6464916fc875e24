"""``bitalloc export``: write a plan in a quantization tool's own config format."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export a plan to GPTQModel, llm-compressor, AutoRound, HQQ, llama.cpp or torchao"

_TARGETS = ("gptqmodel", "llmcompressor", "autoround", "hqq", "llamacpp", "torchao")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="bit plan (.json)")
    p.add_argument("--to", required=True, choices=_TARGETS, help="target tool")
    p.add_argument("-o", "--output", help="output file (default: plan name + the target's suffix)")
    p.add_argument("--model", help="model for module names and shapes (local HF dir, 'minilm', "
                   "'tiny-llama'): checks units, pins unplanned modules, weights the bpw report")
    p.add_argument("--lossy", action="store_true",
                   help="apply the documented fallbacks (raise to the highest setting, nearest "
                   "richer type) instead of refusing; every change is reported")
    p.add_argument("--base", help="gptqmodel: top-level option; llamacpp: llama-quantize ftype")
    p.add_argument("--arch", help="model family for GGUF tensor names (default: the model's "
                   "model_type, else guessed from the names)")


def run(args: argparse.Namespace) -> int:
    from allocator.cli._common import console
    from allocator.core.plan import BitPlan
    from allocator.export import export_plan, get_exporter, model_info, module_of, write_result

    plan = BitPlan.load(args.plan)
    names = shapes = arch = None
    if args.model:
        info = model_info(args.model, {module_of(u)[0] for u in plan.assignments})
        names, shapes, arch = info.names, info.shapes, info.arch
    out = Path(args.output) if args.output else Path(args.plan).with_suffix(get_exporter(args.to).SUFFIX)
    if out.resolve() == Path(args.plan).resolve():
        out = out.with_name(f"{out.stem}.{args.to}{out.suffix}")
    result = export_plan(plan, args.to, model_names=names, shapes=shapes, lossy=args.lossy,
                         base=args.base, arch=args.arch or arch)
    written = write_result(result, out)
    con = console()
    for note in result.notes:
        con.print(note, markup=False)
    con.print("wrote " + ", ".join(str(w) for w in written), markup=False)
    return 0
