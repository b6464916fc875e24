"""Benchmark: peak RSS and wall time of sequential (block-by-block) mode against the whole model.

Run:  PYTHONPATH=. python benchmarks/sequential_memory.py [--layers 8] [--hidden 1024]
          [--intermediate 2816] [--samples 8] [--seq-len 64] [--json out.json]

A Llama-shaped model with seeded random weights is built from a config and saved as safetensors
in a temporary directory (time and memory do not depend on the weights). Each mode then runs in a
fresh process, so its peak RSS (``ru_maxrss``) is its own:

* ``whole-gptq``: ``load_model`` + ``apply_plan(method="gptq")``;
* ``seq-gptq``: ``apply_plan_sequential`` (keeps nothing, writes the quantized model);
* ``whole-hessian-proxy`` / ``seq-hessian-proxy``: the layer-local estimator both ways;
* ``whole-gauss-newton`` / ``seq-gauss-newton``: the default estimator both ways (sequential by
  a reverse sweep over the blocks).

``baseline`` is the RSS of a process that imported torch and transformers and built the
calibration batches: the mode's own memory is ``peak − baseline``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("baseline", "whole-gptq", "seq-gptq", "whole-hessian-proxy", "seq-hessian-proxy",
         "whole-gauss-newton", "seq-gauss-newton")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(path: Path, args: argparse.Namespace) -> int:
    import torch
    import transformers

    from allocator.model.loading import tiny_lm_path

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.from_pretrained(str(tiny_lm_path()), local_files_only=True)
    cfg.num_hidden_layers, cfg.hidden_size = args.layers, args.hidden
    cfg.intermediate_size, cfg.head_dim = args.intermediate, args.hidden // cfg.num_attention_heads
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tiny_lm_path() / f).read_bytes())
    return sum(p.numel() for p in model.parameters())


def run_mode(mode: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: F401
    import transformers

    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable
    from allocator.core.units import discover_units
    from allocator.model.data import CalibrationData
    from allocator.model.loading import load_model
    from allocator.model.sequential import SequentialModel

    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    calib = list(CalibrationData.from_corpus(tok, n_samples=args.samples, seq_len=args.seq_len,
                                             batch_size=4))
    units = discover_units(SequentialModel(path).model)  # meta skeleton: names and shapes only
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=["int4-g128-asym"], cost=[[0.0]] * len(units),
                                      in_features=[u.in_features for u in units])
    plan = BitPlan.from_choice(table, dict.fromkeys(table.units, "int4-g128-asym"))
    base = _rss_mb()
    t0 = time.perf_counter()
    if mode == "whole-gptq":
        from allocator.backend import apply_plan

        apply_plan(load_model(path).model, plan, method="gptq", calibration=calib, units=units)
    elif mode == "seq-gptq":
        from allocator.backend import apply_plan_sequential

        with tempfile.TemporaryDirectory() as out:
            apply_plan_sequential(path, plan, calibration=calib, units=units, save_dir=out)
    elif mode.startswith("whole-"):
        from allocator.core.formats import parse_format
        from sensitivity import EstimateContext, get_estimator

        ctx = EstimateContext(batches=calib, units=units, options=[parse_format("int4-g128-asym")],
                              model_kind="causal_lm", progress=False)
        get_estimator(mode.removeprefix("whole-")).estimate(load_model(path).model, ctx)
    elif mode.startswith("seq-"):
        from sensitivity import EstimateSpec, estimate

        # the public entry point; its fingerprint reads the checkpoint one tensor at a time
        estimate(path, EstimateSpec(method=mode.removeprefix("seq-"), options="int4-g128-asym",
                                    samples=args.samples, seq_len=args.seq_len, batch_size=4, sequential=True,
                                    progress=False))
    return {"mode": mode, "baseline_mb": round(base), "peak_mb": round(_rss_mb()),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=list(MODES[1:]), choices=MODES[1:])
    ap.add_argument("--json")
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    ap.add_argument("--_path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mode == "build":
        print(build(Path(args._path), args))
        return
    if args._mode:
        print(json.dumps(run_mode(args._mode, Path(args._path), args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        # Built in a child: Linux keeps a process's peak RSS across fork + exec, so a parent that
        # had held the model would set every mode's baseline to the model's size.
        built = subprocess.run([sys.executable, __file__, "--_mode", "build", "--_path", str(path),
                                *sys.argv[1:]], capture_output=True, text=True, check=True)
        n = int(built.stdout.strip().splitlines()[-1])
        print(f"model: {n / 1e6:.1f}M params, fp32 {n * 4 / 2**20:.0f} MB, {args.layers} blocks")
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--_mode", mode, "--_path", str(path),
                   *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:22s} peak {row['peak_mb']:6d} MB  (+{row['peak_mb'] - row['baseline_mb']:5d} "
                  f"over {row['baseline_mb']} MB)  {row['wall_s']:7.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
