"""``bitalloc export``: write a plan in a quantization tool's own config format, a llama.cpp preset
as a plan (``--preset``), or the quantized model itself as a GGUF file (``--to llamacpp --gguf``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "export a plan to GPTQModel, llm-compressor, AutoRound, HQQ, llama.cpp (config or GGUF) or torchao"

_TARGETS = ("gptqmodel", "llmcompressor", "autoround", "hqq", "llamacpp", "torchao")
_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", nargs="?", help="bit plan (.json); omit with --preset")
    p.add_argument("--to", choices=_TARGETS, help="target tool (required unless --preset)")
    p.add_argument("-o", "--output", help="output file (default: plan name + the target's suffix; "
                   "with --preset and no --to: the plan JSON)")
    p.add_argument("--model", help="model for module names and shapes (local HF dir, 'minilm', "
                   "'tiny-llama'): checks units, pins unplanned modules, weights the bpw report")
    p.add_argument("--lossy", action="store_true",
                   help="apply the documented fallbacks (raise to the highest setting, nearest "
                   "richer type) instead of refusing; every change is reported")
    p.add_argument("--base", help="gptqmodel: top-level option; llamacpp: llama-quantize ftype; "
                   "llamacpp --gguf: type of tensors outside the plan (f16, bf16, f32, q8_0)")
    p.add_argument("--arch", help="model family for GGUF tensor names (default: the model's "
                   "model_type, else guessed from the names)")
    p.add_argument("--gguf", metavar="OUT.gguf", help="with --to llamacpp and --model: write the "
                   "quantized model as a GGUF file (tensors, metadata, tokenizer)")
    p.add_argument("--preset", choices=_PRESETS, help="instead of PLAN: the plan llama-quantize's "
                   "preset makes for --model (llama.cpp's per-tensor rules and row fallbacks)")


def _preset_plan(args: argparse.Namespace, con: Any) -> tuple[Any, Path]:
    from allocator.core.errors import InvalidParameterError
    from allocator.export.llamacpp_presets import llamacpp_preset_plan

    if args.plan is not None:
        raise InvalidParameterError(f"--preset {args.preset} makes the plan; drop PLAN ({args.plan!r})")
    if not args.model:
        raise InvalidParameterError(f"--preset {args.preset} needs --model (the rules read its shapes)")
    plan = llamacpp_preset_plan(args.model, args.preset)
    name = Path(args.model).name or "model"
    if args.output and not args.to:
        path = Path(args.output)
    elif args.gguf or args.output:  # next to what the export writes
        path = Path(args.gguf or args.output).with_suffix(".plan.json")
    else:
        path = Path(f"{name}.{args.preset}.plan.json")
    plan.save(path)
    s = plan.summary
    con.print(f"llama.cpp {args.preset}: {len(plan.assignments)} units, {s.params} params, "
              f"{s.bpw:.4f} bpw ({s.size_bits / 8:.0f} bytes); wrote {path}", markup=False)
    return plan, path


def _write_gguf(args: argparse.Namespace, plan: Any, con: Any) -> int:
    from allocator.core.errors import InvalidParameterError
    from allocator.export.gguf_writer import write_gguf

    if args.to != "llamacpp" or not args.model:
        raise InvalidParameterError("--gguf writes a llama.cpp model: pass --to llamacpp and --model")
    result = write_gguf(plan, args.model, args.gguf, lossy=args.lossy, outtype=args.base or "f16")
    for note in result.notes:
        con.print(note, markup=False)
    con.print(f"wrote {result.path}", markup=False)
    return 0


def run(args: argparse.Namespace) -> int:
    from allocator.cli._common import console
    from allocator.core.errors import InvalidParameterError
    from allocator.core.plan import BitPlan
    from allocator.export import export_plan, get_exporter, model_info, module_of, write_result

    con = console()
    if args.preset:
        plan, plan_path = _preset_plan(args, con)
        if not args.to:
            return 0
    elif args.plan is None or args.to is None:
        raise InvalidParameterError("pass PLAN and --to TARGET (or --preset NAME --model M)")
    else:
        plan, plan_path = BitPlan.load(args.plan), Path(args.plan)
    if args.gguf:
        return _write_gguf(args, plan, con)
    names = shapes = arch = None
    if args.model:
        info = model_info(args.model, {module_of(u)[0] for u in plan.assignments})
        names, shapes, arch = info.names, info.shapes, info.arch
    out = Path(args.output) if args.output else plan_path.with_suffix(get_exporter(args.to).SUFFIX)
    if out.resolve() == plan_path.resolve():
        out = out.with_name(f"{out.stem}.{args.to}{out.suffix}")
    result = export_plan(plan, args.to, model_names=names, shapes=shapes, lossy=args.lossy,
                         base=args.base, arch=args.arch or arch)
    written = write_result(result, out)
    for note in result.notes:
        con.print(note, markup=False)
    con.print("wrote " + ", ".join(str(w) for w in written), markup=False)
    return 0
