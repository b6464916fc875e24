"""Benchmark: estimators at real model sizes — wall time, peak RSS, forward-pass equivalents.

Run:  PYTHONPATH=. python benchmarks/scale.py --configs bert-base [llama-1b] [llama-1b-128k] \
          [--estimators gauss-newton fisher ... evaluate] [--samples 8] [--include GLOB ...] \
          [--layers N] [--json out.json]

Each (configuration, estimator, variant) runs in a fresh process, which builds the model from
its config with seeded random weights (time and memory do not depend on the weights), so its
peak RSS is that estimate's alone. ``model`` is the RSS once the model is built and the
construction's transients are released (fp32 weights + interpreter + torch); the peak is the
high-water mark reset at that point (``/proc/self/clear_refs``; elsewhere the lifetime
``ru_maxrss``). The issue's target is ``model + one batch's activations + 1 GB``, printed as
``target``; the activations are measured first, in their own process.
Forward-pass equivalents count the rows every transformer block processes, divided by (blocks ×
calibration rows): a full forward over the calibration set is 1.0, a block-cached trial that
starts halfway is 0.5. Backward passes are not counted.

Variants compare each estimator with its previous implementation in the same run where one
exists: ``gauss-newton`` / ``fisher`` with every float32 delta resident (one pass,
``delta_budget_mb`` unbounded) against the default budget; ``hessian-trace`` with the old fixed
probe count against the stopping rule.

Configurations: ``minilm`` (the bundled 22M encoder), ``bert-base`` (110M, BERT-base shape,
MiniLM's tokenizer), ``llama-1b`` (≈ 0.94B: 16 layers, hidden 2048, MLP 5504, vocab 32000,
the tiny LM's tokenizer) and ``llama-1b-128k`` (Llama-3.2-1B's shape, 1.24B: 16 layers, hidden
2048, MLP 8192, 32 heads / 8 KV heads, vocab 128256, tied embeddings; the tiny LM's tokenizer,
whose ids all lie inside the 128k vocabulary, so every logit row is 128256 wide). ``--layers N``
keeps N of the blocks (vocabulary and widths stay real) so a 2-core machine finishes; the memory
target is relative to the model that was built, and the table says how many layers it had.

``evaluate`` is a pseudo-estimator: the held-out stage of ``run`` (reference outputs, every unit
RTN-quantized to int4-g128-asym in place, then :func:`allocator.backend.evaluate`), the other
stage that holds vocabulary-wide outputs. ``run`` is the whole ``bitalloc run`` at defaults
(``--samples`` calibration and evaluation texts, ``--bpw``, the refinement cut at
``--refine-time``) on the configuration saved to a model directory; its row prints each stage's
peak. ``within`` says whether a row's peak met the target.

    PYTHONPATH=. python benchmarks/scale.py --configs llama-1b-128k --layers 4 --estimators run \
        --samples 8 --no-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
# the checkout's packages first: this folder's solvers.py (a benchmark) must not shadow `solvers`
sys.path.insert(0, str(ROOT))

#: estimator → {variant: extra estimator parameters}; "default" is the current implementation.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "hessian-proxy": {"default": {}},
    "salience": {"default": {}},
    "gauss-newton": {"default": {}, "all-resident": {"delta_budget_mb": 1e9},
                     "budget-1024": {"delta_budget_mb": 1024}},  # the default before 512
    "fisher": {"default": {}, "all-resident": {"delta_budget_mb": 1e9}},
    "hessian-trace": {"default": {}, "fixed-16": {"rel_sem": 0, "max_probes": 16}},
    "measured": {"default": {}},
    "relevance": {"default": {}},
    "datafree": {"default": {}},
}


#: pseudo-estimator of the child: measures one batch's activations for the memory target
ONE_BATCH = "one-batch"
#: pseudo-estimator of the child: the run's evaluate stage (reference outputs, quantize, evaluate)
EVALUATE = "evaluate"
#: pseudo-estimator of the child: the whole ``bitalloc run`` at defaults on the configuration
#: (saved to a model directory first, loaded from it by the run as a user's run loads it)
RUN = "run"

#: Llama-3.2-1B's shape (the issue's "≈1B Llama with a 128k vocabulary")
LLAMA_1B_128K = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "tie_word_embeddings": True, "max_position_embeddings": 512}


def build(config: str, layers: int | None = None) -> Any:
    """The configuration's :class:`LoadedModel` (random weights from a fixed seed); ``layers``
    overrides a Llama configuration's block count."""
    import torch
    import transformers

    from allocator.model.loading import LoadedModel, ModelKind, default_model_path, load_model, tiny_lm_path

    if config == "minilm":
        return load_model("minilm")
    torch.manual_seed(0)
    model: Any
    if config == "bert-base":
        model = transformers.BertModel(transformers.BertConfig())
        tok = transformers.AutoTokenizer.from_pretrained(default_model_path())
        kind = ModelKind.ENCODER
    elif config in ("llama-1b", "llama-1b-128k"):
        shape: dict[str, Any] = (LLAMA_1B_128K if config == "llama-1b-128k" else dict(
            hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512))
        cfg = transformers.LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
        model = transformers.LlamaForCausalLM(cfg)
        tok = transformers.AutoTokenizer.from_pretrained(tiny_lm_path())
        kind = ModelKind.CAUSAL_LM
    else:
        raise SystemExit(f"unknown config {config!r}: use minilm, bert-base, llama-1b or llama-1b-128k")
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, kind=kind, name=config, path=f"random:{config}",
                       fingerprint=f"random-{config}-seed0")


def _blocks(model: Any) -> list[Any]:
    import torch

    best: list[Any] = []
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            best = list(mod)
    return best


def one_batch_gb(loaded: Any, batch: int, seq_len: int) -> float:
    """Peak RSS growth of one batch's forward with its activations kept, then a backward that
    allocates a single weight gradient: the "activations of one batch" of the memory target,
    measured from the resident set after the model's construction (:func:`_model_rss_gb`)."""
    import torch

    before = _model_rss_gb()
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (batch, seq_len))
    weight = next(m.weight for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
    with torch.enable_grad():
        out = loaded.model(input_ids=ids)
        first = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        torch.autograd.grad(first.float().pow(2).mean(), [weight])
    return max(_peak_gb() - before, 0.0)


def evaluate_stage(loaded: Any, samples: int, seq_len: int) -> dict[str, Any]:
    """The run's held-out stage: reference outputs of ``samples`` evaluation rows, every linear
    unit RTN-quantized to int4-g128-asym in place, then the evaluation against the reference."""
    import torch

    from allocator.backend import evaluate, reference_outputs
    from allocator.core.formats import parse_format
    from allocator.core.units import discover_units, unit_weight
    from allocator.model.data import user_data_for
    from allocator.model.quant import RtnQuantizer

    data = user_data_for(loaded, "evaluation", samples, seq_len=seq_len, batch_size=min(8, samples))
    ref = reference_outputs(loaded.model, list(data), kind=loaded.kind,
                            model_fingerprint=loaded.fingerprint)
    fmt, rtn = parse_format("int4-g128-asym"), RtnQuantizer()
    with torch.no_grad():
        for unit in discover_units(loaded.model):
            w = unit_weight(loaded.model, unit)
            w.copy_(rtn.quantize(unit, w.detach().float(), fmt).to(w.dtype))
    from allocator.core.rss import release_free_memory, reset_peak_rss

    ref_apply = _peak_gb()  # reference outputs and the in-place quantization (run's apply stage)
    release_free_memory()
    reset_peak_rss()
    report = evaluate(loaded.model, list(data), ref)
    return {"passes": None, "ref_and_quantize_peak_gb": round(ref_apply, 2),
            "evaluate_only_peak_gb": round(_peak_gb(), 2),
            "metrics": {k: round(float(v), 4) for k, v in report.metrics.items()}}


def run_stages(loaded: Any, samples: int, seq_len: int, params: dict[str, Any]) -> dict[str, Any]:
    """``bitalloc run DIR --bpw B`` at defaults but ``samples`` calibration and evaluation texts
    and the refinement's ``refine_time`` (params: ``bpw`` 3.25, ``refine_time`` 120 s): the
    model is saved to a temporary directory and dropped, then :func:`run_pipeline` loads it
    from there; each stage's seconds and peak RSS (GB) come from its ``results.json``."""
    import shutil
    import tempfile

    from allocator.core.rss import release_free_memory
    from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec

    tmp = Path(tempfile.mkdtemp(prefix="bitalloc-scale-"))
    try:
        loaded.model.save_pretrained(tmp / "model")
        loaded.tokenizer.save_pretrained(tmp / "model")
        del loaded
        release_free_memory()
        cfg = RunConfig(model=str(tmp / "model"), bpw=float(params.get("bpw", 3.25)), out=tmp / "out",
                        estimate=run_spec(samples=samples, seq_len=seq_len, progress=False),
                        eval_samples=samples, refine_time_limit=float(params.get("refine_time", 120)))
        t0 = time.perf_counter()
        run_pipeline(cfg)
        wall = time.perf_counter() - t0
        results = json.loads((tmp / "out" / "results.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peaks = {k: round(v / 1024, 2) for k, v in results["peak_rss_mb"].items()}
    return {"wall_s": round(wall, 1), "stage_peak_gb": peaks,
            "stage_seconds": {k: round(v, 1) for k, v in results["seconds"].items()},
            "peak_rss_gb": max(peaks.values()), "per_stage": results.get("peak_rss_per_stage")}


def _model_rss_gb() -> float:
    """The resident set once the model is built, its construction's transients released (a
    random init of a 128k × 2048 embedding peaks well above what stays); the high-water mark is
    reset to it, so :func:`_peak_gb` is the stage's own peak. Where the mark cannot be reset, the
    lifetime peak (``ru_maxrss``) stands for both, as before."""
    from allocator.core.rss import release_free_memory, reset_peak_rss

    release_free_memory()
    status = Path("/proc/self/status")
    if reset_peak_rss() and status.exists():
        kb = next(int(ln.split()[1]) for ln in status.read_text().splitlines() if ln.startswith("VmRSS:"))
        return kb / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _peak_gb() -> float:
    from allocator.core.rss import peak_rss_mb

    return peak_rss_mb() / 1024


def child(config: str, estimator: str, params: dict[str, Any], samples: int, seq_len: int,
          include: list[str] | None = None, layers: int | None = None) -> None:
    from allocator.core.rss import bound_heap
    from sensitivity import EstimateSpec, estimate

    bound_heap()  # as a run does (StageMeter): freed buffers leave the process
    loaded = build(config, layers)
    if estimator == ONE_BATCH:
        act = one_batch_gb(loaded, min(8, samples), seq_len)
        print(json.dumps({"config": config, "one_batch_gb": round(act, 2)}))
        return
    params_n = sum(p.numel() for p in loaded.model.parameters())
    model_rss = _model_rss_gb()
    if estimator == EVALUATE:
        t0 = time.perf_counter()
        out = evaluate_stage(loaded, samples, seq_len)
        print(json.dumps({
            "config": config, "estimator": estimator, "params": params, "model_params": params_n,
            "layers": layers, "units": None, "wall_s": round(time.perf_counter() - t0, 1),
            "model_rss_gb": round(model_rss, 2),
            "peak_rss_gb": max(out["ref_and_quantize_peak_gb"], out["evaluate_only_peak_gb"]),
            "fp32_gb": round(4 * params_n / 2**30, 2), "fwd_equiv": 0.0, **out}))
        return
    if estimator == RUN:
        out = run_stages(loaded, samples, seq_len, params)
        print(json.dumps({"config": config, "estimator": estimator, "params": params,
                          "model_params": params_n, "layers": layers, "units": None,
                          "model_rss_gb": round(model_rss, 2), "fp32_gb": round(4 * params_n / 2**30, 2),
                          "fwd_equiv": 0.0, "passes": None, **out}))
        return
    rows = [0]

    def count(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        rows[0] += int(h.shape[0]) if h is not None and h.dim() >= 2 else 0

    blocks = _blocks(loaded.model)
    for b in blocks:
        b.register_forward_pre_hook(count, with_kwargs=True)
    t0 = time.perf_counter()
    table = estimate(loaded, EstimateSpec(method=estimator, samples=samples, seq_len=seq_len,
                                          batch_size=min(8, samples), params=params, progress=False,
                                          include=include))
    wall = time.perf_counter() - t0
    peak = _peak_gb()
    meta = table.metadata
    print(json.dumps({
        "config": config, "estimator": estimator, "params": params, "model_params": params_n,
        "layers": layers, "units": table.n_units, "wall_s": round(wall, 1),
        "model_rss_gb": round(model_rss, 2),
        "peak_rss_gb": round(peak, 2), "fp32_gb": round(4 * params_n / 2**30, 2),
        "fwd_equiv": round(rows[0] / max(len(blocks) * samples, 1), 2),
        "passes": meta.get("passes"), "probes": meta.get("probes"),
    }))


def _child_json(a: argparse.Namespace, config: str, est: str, params: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--samples", str(a.samples), "--seq-len", str(a.seq_len),
           *(["--include", *a.include] if a.include else []),
           *(["--layers", str(a.layers)] if a.layers else []), "--child", config, est, json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(tail)
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["bert-base"])
    ap.add_argument("--estimators", nargs="+", default=["hessian-proxy", "gauss-newton", "fisher"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-baseline", action="store_true", help="only the default variant")
    ap.add_argument("--variants", nargs="+", default=None, help="only these variants (see VARIANTS)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per estimate")
    ap.add_argument("--include", nargs="+", default=None,
                    help="unit globs: estimate only these units (time per unit for the slow ones)")
    ap.add_argument("--layers", type=int, default=None,
                    help="blocks of the Llama configurations (default: all; vocabulary and widths stay)")
    ap.add_argument("--bpw", type=float, default=3.25, help="the run's budget (--estimators run)")
    ap.add_argument("--refine-time", type=float, default=120.0,
                    help="the run's refinement seconds (--estimators run)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "ESTIMATOR", "PARAMS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], json.loads(a.child[2]), a.samples, a.seq_len, a.include, a.layers)
        return
    results = []
    if a.include:
        print(f"units: only {' '.join(a.include)}")
    if a.layers:
        print(f"Llama configurations built with {a.layers} blocks")
    print(f"{'config':<13} {'estimator':<14} {'variant':<13} {'wall s':>7} {'× prev':>7} "
          f"{'peak GB':>8} {'model GB':>9} {'target GB':>9} {'within':>6} {'fwd eq':>7} passes")
    for config in a.configs:
        act_gb = _child_json(a, config, ONE_BATCH, {}).get("one_batch_gb", 0.0)
        print(f"{config:<13} one batch's activations: {act_gb:.2f} GB (in the target)", flush=True)
        for est in a.estimators:
            variants = VARIANTS.get(est, {"default": {}})
            if est == RUN:
                variants = {"default": {"bpw": a.bpw, "refine_time": a.refine_time}}
            prev_wall = None
            for variant, params in reversed(list(variants.items())):  # previous first
                if (a.no_baseline and variant != "default") or (a.variants and variant not in a.variants):
                    continue
                try:
                    r = {**_child_json(a, config, est, params), "variant": variant, "one_batch_gb": act_gb}
                except subprocess.TimeoutExpired:
                    print(f"{config:<13} {est:<14} {variant:<13} timed out after {a.timeout:.0f} s")
                    continue
                except RuntimeError as exc:
                    print(f"{config:<13} {est:<14} {variant:<13} failed: {exc}")
                    continue
                results.append(r)
                ratio = "" if prev_wall is None or variant != "default" else f"{r['wall_s'] / prev_wall:.2f}"
                prev_wall = r["wall_s"] if variant != "default" else prev_wall
                target = r["model_rss_gb"] + act_gb + 1.0
                r["target_gb"], r["within"] = round(target, 2), r["peak_rss_gb"] <= target
                print(f"{config:<13} {est:<14} {variant:<13} {r['wall_s']:>7.1f} {ratio:>7} "
                      f"{r['peak_rss_gb']:>8.2f} {r['model_rss_gb']:>9.2f} {target:>9.2f} "
                      f"{'yes' if r['within'] else 'NO':>6} {r['fwd_equiv']:>7.2f} {r['passes'] or ''}",
                      flush=True)
                if "stage_peak_gb" in r:
                    secs = r["stage_seconds"]
                    print(f"{'':<13} stages (peak GB / s): " + ", ".join(
                        f"{k} {v:.2f} / {secs.get(k, 0):.0f}" for k, v in r["stage_peak_gb"].items()),
                        flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
