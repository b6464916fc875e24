"""Benchmark: ``measured`` — previous one-option-per-forward loop vs the batched-options path
(and the opt-in ``block-gain`` approximation), same model, data and table, same run.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/measured_speed.py [--sequences 128]
      [--units 0] [--groups 4]

MiniLM (the bundled default model), 37 Linear units x int2..int8 g128 asym. The units are split
into ``--groups`` interleaved groups; for each group the previous loop (a verbatim copy of the
loop before issue 13, below), the new default and ``approx="block-gain"`` run back to back, so
that load from other jobs on a shared machine hits all of them alike. Each run builds its own
block cache (one full forward, counted in its time). Printed: wall and CPU seconds, the ratios,
max |Δcost| / cost_std of new vs previous (the table must be equal: < 1 means within the
noise), the block-gain agreement, and the work in forward-pass equivalents against the floor.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import numpy as np
from sensitivity_measured import minilm_batches  # the sibling benchmark: same model and data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = TypeVar("T")


def previous_cost_stats(sums: np.ndarray, counts: np.ndarray, origin: np.ndarray,
                        n_batches: int) -> tuple[float, float, np.ndarray]:
    """(cost, cost_std, per-batch means) from per-sample masked sums and counts, as the previous
    loop computed them (kept here with it, so that the baseline does not move with the package)."""
    b_sum = np.bincount(origin, weights=sums, minlength=n_batches)
    b_cnt = np.bincount(origin, weights=counts, minlength=n_batches)
    means = b_sum / np.maximum(b_cnt, 1.0)
    cost = float(means.mean())
    if n_batches >= 2:
        std = float(means.std(ddof=1) / math.sqrt(n_batches))
    else:
        per_sample = sums / np.maximum(counts, 1.0)
        n = len(per_sample)
        std = float(per_sample.std(ddof=1) / math.sqrt(n)) if n >= 2 else 0.0
    return cost, std, means


def previous_measure(model: Any, ctx: Any, idx: list[int], metric: Any) -> tuple[np.ndarray, np.ndarray]:
    """The measuring loop as it was before issue 13: one forward pass per (unit, option, chunk)."""
    import torch

    from allocator.core.units import unit_weight
    from allocator.model.distortion import distortion, per_sample_sums
    from allocator.model.quant import fake_quantize
    from sensitivity import BlockCache, make_chunks

    n_opt, n_batches = len(ctx.options), len(ctx.batches)
    cache = BlockCache(model, make_chunks(ctx.batches, max_tokens=8192), kind=ctx.model_kind)
    origin = torch.cat([c.origin for c in cache.chunks]).numpy()
    cost, std = np.zeros((len(idx), n_opt)), np.zeros((len(idx), n_opt))
    for r, i in enumerate(idx):
        start = cache.start_block(ctx.units[i])
        view = unit_weight(model, ctx.units[i])
        with torch.no_grad():
            original = view.detach().clone()
        for j, fmt in enumerate(ctx.options):
            with torch.no_grad():
                view.copy_(fake_quantize(original, fmt))
            try:
                sums, counts = [], []
                with torch.inference_mode():
                    for ci, chunk in enumerate(cache.chunks):
                        out = cache.outputs_from(ci, start)
                        s, n = per_sample_sums(distortion(metric, cache.reference[ci], out), chunk.mask)
                        sums.append(s.numpy())
                        counts.append(n.numpy())
            finally:
                with torch.no_grad():
                    view.copy_(original)
            cost[r, j], std[r, j], _ = previous_cost_stats(np.concatenate(sums), np.concatenate(counts),
                                                   origin, n_batches)
    return cost, std


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--units", type=int, default=0, help="measure only this many units (0 = all)")
    ap.add_argument("--groups", type=int, default=4, help="interleaved unit groups")
    args = ap.parse_args()

    import torch

    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units
    from allocator.model.distortion import Metric
    from sensitivity import BlockCache, EstimateContext, make_chunks, measure_units, shard_units

    torch.manual_seed(0)
    model, texts, source, batches = minilm_batches(args.sequences, args.batch_size)
    units = discover_units(model)
    options = parse_options("int2..8-g128-asym")
    ctx = EstimateContext(batches=batches, units=units, options=options, model_kind="encoder",
                          progress=False)
    n_units = args.units or len(units)
    picked = sorted({round(k * (len(units) - 1) / max(1, n_units - 1)) for k in range(n_units)})
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"model: all-MiniLM-L6-v2, {len(picked)} of {len(units)} Linear units x {len(options)} "
          f"options = {len(picked) * len(options)} trials; torch threads {torch.get_num_threads()}")
    print(f"data: {len(texts)} sequences from {source}; {len(batches)} batches; {n_tok} tokens")

    # One full forward of the calibration chunks: the unit of the floor below.
    cache = BlockCache(model, make_chunks(batches, max_tokens=8192), kind="encoder")
    with torch.inference_mode():
        _, t_fwd, c_fwd = timed(lambda: [cache.outputs_from(ci, 0) for ci in range(len(cache.chunks))])


    groups = [[picked[k] for k in g] for g in shard_units(len(picked), args.groups)]
    prev = {"wall": 0.0, "cpu": 0.0}
    new = dict(prev)
    apx = dict(prev)
    upx = dict(prev)
    res: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"prev": {}, "new": {}, "apx": {},
                                                                 "upx": {}}
    forwards = {"new": 0.0, "apx": 0.0, "upx": 0.0}
    for g in groups:
        (c, s), w, cp = timed(partial(previous_measure, model, ctx, g, Metric.COS))
        prev["wall"] += w
        prev["cpu"] += cp
        res["prev"].update({i: (c[r], s[r]) for r, i in enumerate(g)})
        for key, acc, approx in (("new", new, "none"), ("apx", apx, "block-gain"),
                                 ("upx", upx, "unit-gain")):
            rows, w, cp = timed(partial(measure_units, model, ctx, g, approx=approx))
            acc["wall"] += w
            acc["cpu"] += cp
            forwards[key] += rows.info["forwards"] + 1.0  # + the cache's full-precision pass
            res[key].update({i: (rows.cost[r], rows.cost_std[r]) for r, i in enumerate(g)})
        print(f"  group of {len(g)} units: previous {prev['wall']:.1f} s, new {new['wall']:.1f} s, "
              f"block-gain {apx['wall']:.1f} s, unit-gain {upx['wall']:.1f} s (cumulative wall)",
              flush=True)

    def stack(key: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([res[key][i][0] for i in picked]), np.array([res[key][i][1] for i in picked]))

    (pc, ps), (nc, _) = stack("prev"), stack("new")
    ok = ps > 0
    z_new = np.abs(nc - pc)[ok] / ps[ok]
    print(f"one full forward of the calibration set: {t_fwd:.2f} s wall, {c_fwd:.2f} s CPU")
    print(f"previous loop : {prev['wall']:7.1f} s wall  {prev['cpu']:7.1f} s CPU")
    print(f"new (exact)   : {new['wall']:7.1f} s wall  {new['cpu']:7.1f} s CPU   "
          f"ratio {prev['wall'] / new['wall']:.2f}x wall, {prev['cpu'] / new['cpu']:.2f}x CPU")
    print(f"  table: max |dcost|/cost_std = {z_new.max():.2e}; max rel = "
          f"{(np.abs(nc - pc)[pc > 0] / pc[pc > 0]).max():.2e}")
    for key, name, acc in (("apx", "block-gain", apx), ("upx", "unit-gain", upx)):
        ac = stack(key)[0]
        z = np.abs(ac - pc)[ok] / ps[ok]
        rel = np.abs(ac - pc)[pc > 0] / pc[pc > 0]
        rank = np.corrcoef(np.argsort(np.argsort(pc.ravel())), np.argsort(np.argsort(ac.ravel())))[0, 1]
        print(f"{name:<14}: {acc['wall']:7.1f} s wall  {acc['cpu']:7.1f} s CPU   "
              f"ratio {prev['wall'] / acc['wall']:.2f}x wall, {prev['cpu'] / acc['cpu']:.2f}x CPU")
        print(f"  agreement: |dcost|/cost_std median {np.median(z):.2f}, max {z.max():.2f}, "
              f"{(z <= 1).mean():.0%} within cost_std; rel err median {np.median(rel):.1%}, "
              f"max {rel.max():.1%}; Spearman {rank:.3f}")
    print(f"work (forward-pass equivalents incl. cache builds): exact {forwards['new']:.1f}, "
          f"block-gain {forwards['apx']:.1f}, unit-gain {forwards['upx']:.1f} (block-gain re-measures its "
          f"gains in every group)")
    floor = forwards["new"] * t_fwd
    print(f"exact floor at the measured forward speed: {floor:.1f} s wall; new exact path "
          f"{new['wall'] / floor:.2f}x the floor, previous {prev['wall'] / floor:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
