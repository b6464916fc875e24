"""Benchmark: throughput of the numpy ports of ggml's quantizers (``allocator.model.quant.ggml``).

Run:  PYTHONPATH=. python benchmarks/ggml_quant.py [--rows 2048] [--cols 2048] [--repeat 2]
          [--types q4_0,q8_0,q4_K,iq4_nl] [--threads 1] [--clock cpu|wall] [--c-reference]

For each type, quantizes one Gaussian [rows, cols] matrix without and with an importance vector
and prints millions of weights per second. The baseline, measured in the same run on the same
matrix, is gguf-py's numpy quantizer (``gguf.quants.quantize``; it has q4_0, q4_1, q5_0, q5_1 and
q8_0 only, and no importance). ``--c-reference`` adds ggml's own C code (built from the
llama.cpp sources by ``allocator.testing.ggml_reference``, single thread), the ratio port / C,
and checks the bytes. ``--clock cpu`` (default) times the CPU seconds of this process, which other
load on a shared machine disturbs far less than wall time (use ``--clock wall`` with
``--threads`` > 1: CPU time adds the threads up). Compare columns of one run only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from allocator.model.quant import GGML_BLOCKS, quantize_ggml
from allocator.testing.ggml_reference import GgmlReference, load_ggml_reference

_CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}


def _best_seconds(fn: Callable[[], object], repeat: int, clock: str) -> float:
    now = _CLOCK[clock]
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return best


def _row(name: str, w: torch.Tensor, imp: torch.Tensor, ref: GgmlReference | None,
         args: argparse.Namespace) -> str:
    """One table line: Mw/s of the port, gguf-py and (optionally) ggml's C code, and port / C."""
    n = w.numel() / 1e6
    wn, qn = w.numpy(), imp.numpy()
    repeat, clock, th = args.repeat, args.clock, args.threads
    plain = n / _best_seconds(lambda: quantize_ggml(w, name, threads=th), repeat, clock)
    weighted = n / _best_seconds(lambda: quantize_ggml(w, name, importance=imp, threads=th), repeat, clock)
    base = "-"
    if name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        import gguf
        from gguf.quants import quantize as gguf_quantize

        qt = gguf.GGMLQuantizationType[name.upper()]
        base = f"{n / _best_seconds(lambda: gguf_quantize(wn, qt), repeat, clock):.2f}"
    c_plain = c_imp = ratio = same = "-"
    if ref is not None:
        cp = n / _best_seconds(lambda: ref.quantize(wn, name), repeat, clock)
        ci = n / _best_seconds(lambda: ref.quantize(wn, name, qn), repeat, clock)
        c_plain, c_imp, ratio = f"{cp:.2f}", f"{ci:.2f}", f"{plain / cp:.2f}/{weighted / ci:.2f}"
        same = str(
            np.array_equal(ref.quantize(wn, name), quantize_ggml(w, name).data)
            and np.array_equal(ref.quantize(wn, name, qn), quantize_ggml(w, name, importance=imp).data)
        )
    return (f"{name:8s} {plain:9.2f} {weighted:10.2f} {base:>19s} {c_plain:>9s} {c_imp:>9s} "
            f"{ratio:>11s}  {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="the port's threads (C runs single-threaded)")
    ap.add_argument("--clock", choices=tuple(_CLOCK), default="cpu")
    ap.add_argument("--types", default=",".join(GGML_BLOCKS))
    ap.add_argument("--c-reference", action="store_true")
    args = ap.parse_args()
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    imp = torch.rand(args.cols, generator=torch.Generator().manual_seed(1)) ** 2
    n = w.numel() / 1e6
    ref: GgmlReference | None = None
    if args.c_reference:
        ref = load_ggml_reference()
    print(f"[{args.rows} x {args.cols}] = {n:.2f} M weights, port threads {args.threads}, "
          f"{args.clock} clock")
    head = (f"{'port':>9s} {'port+imp':>10s} {'gguf-py (baseline)':>19s} {'ggml C':>9s} {'C+imp':>9s} "
            f"{'port/C':>11s}")
    print(f"Mw/s, higher is better\n{'type':8s} {head}  bytes==C")
    for name in args.types.split(","):
        print(_row(name, w, imp, ref, args), flush=True)


if __name__ == "__main__":
    main()
