"""Benchmark: how much finer units could buy — spread of measured per-bit gains across modules,
across 128-column groups and across 128-row groups of one module.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/granularity.py [--model minilm]
          [--samples 32] [--modules REGEX] [--low int2-g128-asym] [--high int3-g128-asym]

Mixing precision pays only where units differ in how much a bit buys. For each planned Linear
module this measures, on calibration data with the evaluator's metric (``allocator.backend``),
the gain of one step up the palette, ``s = D(low) − D(high)`` per weight, with only that piece
quantized and everything else at full precision:

* the whole module (what ``run`` allocates by default);
* each group of ``--width`` input columns (``run --groups``, SliM-LLM's granularity);
* each group of ``--width`` output rows (heads of q/k/v, neurons of an MLP's first layer).

Printed per module: the coefficient of variation (std / mean) and max / min of ``s`` over its
column groups and over its row groups; then the same statistics of the per-weight module gains
across modules. A knapsack can only exploit spread: with CV 0.2 inside modules against several×
between them, finer units add little to what module-level mixing already takes.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def spread(values: np.ndarray) -> tuple[float, float]:
    """(coefficient of variation, max / min) of positive gains; min is floored at 1e-12."""
    v = np.asarray(values, dtype=float)
    return float(v.std() / v.mean()), float(v.max() / max(v.min(), 1e-12))


def slices(shape: tuple[int, int], width: int, axis: str) -> list[tuple[slice, slice]]:
    """The ``width``-wide row or column pieces of an [out, in] weight (a short last piece is dropped)."""
    out, inn = shape
    n = (out if axis == "row" else inn) // width
    if axis == "row":
        return [(slice(g * width, (g + 1) * width), slice(None)) for g in range(n)]
    return [(slice(None), slice(g * width, (g + 1) * width)) for g in range(n)]


class Probe:
    """Measures D with one piece of one module quantized (weights restored after each call)."""

    def __init__(self, name: str, samples: int, seed: int) -> None:
        from allocator.backend import reference_outputs
        from allocator.model.data import data_for
        from allocator.model.loading import load_model

        self.loaded = load_model(name)
        self.model = self.loaded.model.eval()
        self.batches = list(data_for(self.loaded, "calibration", samples, seed=seed))
        self.ref = reference_outputs(self.model, self.batches, kind=str(self.loaded.kind))

    def error(self, module: str, piece: tuple[slice, slice], fmt: Any) -> float:
        import torch

        from allocator.backend import evaluate
        from allocator.core.units import get_module, weight_view
        from allocator.model.quant import fake_quantize

        w = weight_view(get_module(self.model, module), module)
        keep = w.detach().clone()
        try:
            with torch.no_grad():
                w[piece] = fake_quantize(keep[piece].contiguous(), fmt)
            return float(evaluate(self.model, self.batches, self.ref).error)
        finally:
            with torch.no_grad():
                w.copy_(keep)

    def gain(self, module: str, piece: tuple[slice, slice], low: Any, high: Any) -> float:
        return self.error(module, piece, low) - self.error(module, piece, high)


def main(argv: list[str] | None = None) -> int:
    import torch

    from allocator.core.formats import parse_format
    from allocator.core.units import discover_units
    from allocator.model.unit_select import select_units

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--modules", default=None, help="regex on module names (default: every planned one)")
    ap.add_argument("--low", default="int2-g128-asym")
    ap.add_argument("--high", default="int3-g128-asym")
    ap.add_argument("--width", type=int, default=128, help="rows / columns per piece")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    low, high = parse_format(args.low), parse_format(args.high)
    probe = Probe(args.model, args.samples, args.seed)
    units = select_units(probe.loaded, discover_units(probe.model), batch=probe.batches[0]).units
    pattern = re.compile(args.modules) if args.modules else None
    chosen = [u for u in units if pattern is None or pattern.search(u.module)]
    print(f"{args.model}: {len(chosen)} modules, gain = D({args.low}) − D({args.high}), "
          f"{args.samples} calibration samples, pieces of {args.width}")
    print(f"{'module':<48} {'gain/weight':>11} {'cols n':>6} {'cv':>5} {'max/min':>7} "
          f"{'rows n':>6} {'cv':>5} {'max/min':>7}")
    per_weight: list[float] = []
    inner: dict[str, list[float]] = {"col": [], "row": []}
    for u in chosen:
        shape = (u.shape[0], u.params // u.shape[0])
        whole = probe.gain(u.module, (slice(None), slice(None)), low, high) / u.params
        per_weight.append(whole)
        cells = [f"{u.module:<48} {whole:>11.3e}"]
        for axis in ("col", "row"):
            gains = np.array([probe.gain(u.module, p, low, high) for p in slices(shape, args.width, axis)])
            if len(gains) >= 2 and gains.min() > 0:
                cv, ratio = spread(gains)
                inner[axis].append(cv)
                cells.append(f"{len(gains):>6} {cv:>5.2f} {ratio:>7.1f}")
            else:
                cells.append(f"{len(gains):>6} {'–':>5} {'–':>7}")
        print(" ".join(cells), flush=True)
    cv, ratio = spread(np.array(per_weight))
    print(f"\nacross modules (gain per weight): cv {cv:.2f}, max/min {ratio:.1f}")
    for axis in ("col", "row"):
        if inner[axis]:
            print(f"inside modules, {axis} groups: median cv {np.median(inner[axis]):.2f}, "
                  f"max cv {max(inner[axis]):.2f} over {len(inner[axis])} modules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
