"""Real-LLM quality at equal size: bitalloc's plans against uniform GPTQ and llama.cpp's presets.

For a causal LM (default ``smollm2``, SmolLM2-135M-Instruct; ``tiny-llama`` for a quick check)
it measures on held-out data — the corpus' ``evaluation`` split, disjoint from the calibration
split the plans are chosen on — KL(P_fp ‖ P_q) of the next-token distributions and perplexity,
each with a bootstrap 95 % interval over evaluation texts (packed windows of ``--seq-len``
tokens), and the ratio of each plan to its baseline with a *paired* bootstrap interval (the same
resampled texts for both plans):

a) **GPTQ** at each budget (default 3.25 and 4.25 bpw): the ``bitalloc run --method gptq`` plan
   (dense palette, GPTQ costs, candidates and refinement: the pipeline's public stages,
   :func:`allocator.jobs.pipeline.estimate_table`, :func:`solvers.solve`,
   :func:`allocator.jobs.pipeline.uniform_plans`, :func:`allocator.jobs.refine.refine_plan`) vs
   the uniform plan of exactly that size (int3-g128-asym = 3.25, int4-g128-asym = 4.25 bpw:
   ``uniform_plans``' pick, its label and bpw printed), and the plan chosen with RTN costs but
   applied with GPTQ (what ``--method gptq`` did before). All applied with the backend's GPTQ
   (``apply_plan(method="gptq")``). As in ``run``, the per-unit GPTQ takes its Hessians from
   each budget's uniform plan as the backend applies it
   (:func:`allocator.jobs.pipeline.run_quantizer`), so each budget has its own GPTQ cost table;
   costs and quantizers are fitted on the calibration data's fit share, as ``run`` does.
b) **llama.cpp** for each preset (Q2_K … Q4_K_M, :func:`allocator.export.llamacpp_preset_plan`):
   the preset's plan, its exact size (bpw over the plan's units) and the ``bitalloc run --for
   llamacpp`` plan solved at exactly that size (``Budget(size_bytes=…)``), made as ``run`` makes it:
   costs, candidates and refinement with llama.cpp's own quantizers (``--method ggml``, the
   imatrix from the calibration texts). Both plans are applied the same way,
   ``apply_plan(method="ggml")`` with that imatrix, as ``llama-quantize --imatrix`` would
   (``--no-imatrix``: ggml's reference quantizers for both, as ``llama-quantize`` without one).

Targets (issue 18): the GPTQ plan ≤ 0.85× the KL of uniform GPTQ with no worse perplexity; the
llamacpp plan never worse than the preset (KL and perplexity) and ≤ 0.85× its KL where the
preset's KL is above 0.01. "met" is judged on the point estimates; the intervals say how sure.

    PYTHONPATH=. python benchmarks/llm_quality.py --model tiny-llama --calib 16 --evals 32 \\
        --presets Q4_K_M --json llm_quality.json
    PYTHONPATH=. python benchmarks/llm_quality.py --model smollm2 --calib 32 --evals 64 \\
        --budgets 3.25 4.25 --presets Q3_K_M Q4_K_M

SmolLM2's weights lie on Q4_1's grid (4 bits, 32-element blocks): ≥ 4-bit options with 32-column
groups are nearly lossless on it; its 576-wide rows are not a multiple of 256, so llama.cpp (and
the presets here) store most of its tensors in fallback types (q4_0, q5_0, q5_1, q8_0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator.backend import (  # noqa: E402  (the checkout's package, after the path above)
    Contrast,
    SampleStats,
    metric_intervals,
    paired_comparison,
    percentile_interval,
    resamples,
)

BUDGETS = (3.25, 4.25)
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")
#: KL-ratio target of both parts, and the preset KL above which the llamacpp part must reach it
TARGET_RATIO = 0.85
PRESET_KL_FLOOR = 0.01


# ---------------------------------------------------------------------------- per-text metrics
# Per evaluation text (a packed window): Σ KL over its tokens, its token count, Σ NLL over its
# targets and their count — the per-sample sums of allocator.backend.evaluate (EvalReport.samples),
# whose ratios of sums are the corpus values; the bootstrap is allocator.backend's.
def summarize(m: SampleStats, idx: np.ndarray) -> dict[str, Any]:
    """KL and perplexity, each with its percentile 95 % interval over the resamples ``idx``."""
    ci = metric_intervals(m, idx)
    return {"kl": ci["kl"].to_dict(), "perplexity": ci["perplexity"].to_dict()}


def compare(a: SampleStats, b: SampleStats, idx: np.ndarray) -> dict[str, Any]:
    """Paired ratios a / b of KL and perplexity, resampling the same texts for both."""
    c = paired_comparison(a, b, idx)
    for k in ("kl", "perplexity"):
        if c[k].contrast is not Contrast.RATIO:
            raise SystemExit(f"the baseline's {k} is 0 on some resample: no ratio to report")
    return {"kl_ratio": c["kl"].delta.to_dict(), "ppl_ratio": c["perplexity"].delta.to_dict()}


def text_metrics(model: Any, batches: Sequence[Mapping[str, Any]], ref: Any) -> SampleStats:
    """Per-text KL to the reference logits and NLL, one batch in memory at a time."""
    from allocator.backend import evaluate

    stats = evaluate(model, batches, ref).samples
    if stats is None:
        raise SystemExit("evaluate returned no per-sample sums")
    return stats


# ---------------------------------------------------------------------------- the model
class Bench:
    """One causal LM: calibration and held-out batches, units, fp weights and reference logits."""

    def __init__(self, name: str, calib: int, evals: int, seq_len: int, seed: int) -> None:
        from allocator.backend import reference_outputs
        from allocator.core.units import discover_units
        from allocator.jobs.pipeline import DEFAULT_RUN_BATCH_SIZE
        from allocator.model.data import user_data_for
        from allocator.model.loading import load_model
        from allocator.model.output_store import TensorStash
        from allocator.model.unit_select import select_units

        self.name = name
        self.loaded = load_model(name)
        self.model = self.loaded.model.eval()
        if str(self.loaded.kind) != "causal_lm":
            raise SystemExit(f"{name} is a {self.loaded.kind}; this benchmark needs a causal LM")
        def split(name: str, n: int) -> Any:
            return user_data_for(self.loaded, name, n, seq_len=seq_len, batch_size=DEFAULT_RUN_BATCH_SIZE,
                                 seed=seed)

        self.calib = split("calibration", calib)
        self.fit = _fit_share(self.calib)  # what run estimates and fits its quantizer on
        self.held = list(split("evaluation", evals))
        self.units = list(select_units(self.loaded, discover_units(self.model),
                                       batch=next(iter(self.calib))).units)
        self.state = TensorStash(self.model.state_dict())
        self.ref = reference_outputs(self.model, self.held, kind="causal_lm",
                                     model_fingerprint=self.loaded.fingerprint)
        self.fp = text_metrics(self.model, self.held, self.ref)

    def measure(self, apply: Callable[[], object]) -> SampleStats:
        """Apply a plan (``apply`` quantizes the weights in place), measure, restore fp weights."""
        self.state.restore(self.model)
        try:
            apply()
            return text_metrics(self.model, self.held, self.ref)
        finally:
            self.state.restore(self.model)

    def gptq(self, plan: Any) -> SampleStats:
        from allocator.backend import apply_plan

        return self.measure(lambda: apply_plan(self.model, plan, method="gptq",
                                               calibration=list(self.calib), units=self.units))

    def ggml(self, plan: Any, imatrix: bool) -> SampleStats:
        """llama.cpp's quantizers, unit by unit (a tied head is one unit, quantized once), with the
        imatrix of the calibration texts or none."""
        from allocator.backend import apply_plan

        return self.measure(lambda: apply_plan(self.model, plan, method="ggml", units=self.units,
                                               calibration=list(self.calib) if imatrix else None))


# ---------------------------------------------------------------------------- plans
def run_config(bench: Bench, method: str, consumer: str | None, args: argparse.Namespace) -> Any:
    from allocator.jobs.pipeline import RunConfig, run_spec

    return RunConfig(model=bench.name, bpw=3.0, method=method, consumer=consumer, out=None,
                     estimate=run_spec(args.estimator, samples=args.calib, seq_len=args.seq_len,
                                       seed=args.seed, progress=False,
                                       options=None if consumer else args.options),
                     refine_rounds=args.rounds, refine_time_limit=args.refine_time)


def table_for(bench: Bench, cfg: Any, quantizer: Any) -> Any:
    """The cost table as ``run`` estimates it: on the calibration data's fit share."""
    from allocator.jobs.pipeline import estimate_table

    return estimate_table(bench.loaded, bench.fit, cfg, bench.units, quantizer)


def _fit_share(calib: Any) -> Any:
    from allocator.model.data.split import DEFAULT_VALIDATION_SHARE, split_calibration

    # run_config leaves RunConfig.validation_share at its default
    return split_calibration(calib, DEFAULT_VALIDATION_SHARE).fit


def run_plan(bench: Bench, table: Any, budget: Any, cfg: Any, quantizer: Any) -> tuple[Any, Any, Any]:
    """What ``run`` hands out at ``budget`` (:func:`allocator.jobs.pipeline.select_plan`: the
    better measured of the table's optimum and the uniform plan that fits, refined, then for
    GPTQ the choice among them as the backend applies them, all judged on the calibration
    data's validation share); that uniform plan; the applied choice (None for other methods)."""
    import solvers
    from allocator.jobs.pipeline import run_candidates, select_plan, uniform_plans
    from allocator.model.data.split import split_calibration

    # (mypy, run on this folder, takes benchmarks/solvers.py for the package)
    opt = solvers.solve(table, budget, solver=cfg.solver,  # type: ignore[attr-defined,unused-ignore]
                        seed=cfg.estimate.seed).plan
    if opt is None:
        raise SystemExit(f"no plan fits {budget}; raise the budget")
    below, _ = uniform_plans(table, budget.size_cap_bits(table.total_params))
    cands = run_candidates(table, budget, opt, below)
    data = bench.calib if cfg.validation_share == 0 else split_calibration(bench.calib, cfg.validation_share)
    _, applied, plan = select_plan(bench.loaded, cfg, cands, table, budget, data, bench.units,
                                   quantizer, bench.state, say)
    bench.state.restore(bench.model)
    return plan, below, applied


def plan_label(plan: Any) -> str:
    from allocator.jobs.report import plan_label as label

    return str(label(plan))


def _bpw(plan: Any) -> float:
    return round(float(plan.summary.bpw), 4)


# ---------------------------------------------------------------------------- a) GPTQ
def gptq_part(bench: Bench, args: argparse.Namespace, idx: np.ndarray,
              keep: Callable[[dict[str, Any]], None]) -> None:
    """The ``run --method gptq`` plan, the RTN-chosen plan and uniform GPTQ at each budget."""
    import dataclasses

    from allocator.core.budget import Budget
    from allocator.jobs.pipeline import run_quantizer

    names = ["gptq"] + ([] if args.no_rtn_chosen else ["rtn"])
    rtn_table = None
    for bpw in args.budgets:
        budget = Budget(bpw=bpw)
        plans: dict[str, Any] = {}
        choice: dict[str, Any] | None = None
        for name in names:
            t0 = time.perf_counter()
            cfg = dataclasses.replace(run_config(bench, name, None, args), bpw=bpw)
            # as run builds it: GPTQ's Hessians from the uniform plan of this budget as applied
            q = run_quantizer(bench.loaded, cfg, bench.fit, bench.units, say)
            table = rtn_table if name == "rtn" and rtn_table is not None else table_for(bench, cfg, q)
            if name == "rtn":
                rtn_table = table
            say(f"  {bpw:g} bpw, {name} quantizer and cost table: {time.perf_counter() - t0:.0f} s")
            t0 = time.perf_counter()
            plans[f"{name}-chosen"], below, applied = run_plan(bench, table, budget, cfg, q)
            if name == "gptq":
                plans["uniform"] = below
                choice = None if applied is None else applied.to_dict()
            say(f"  {bpw:g} bpw, {name}-chosen plan: {time.perf_counter() - t0:.0f} s")
        if plans["uniform"] is None:
            raise SystemExit(f"no uniform plan fits {bpw:g} bpw; pass budgets ≥ the smallest option's")
        measured = {k: bench.gptq(p) for k, p in plans.items()}
        base = measured["uniform"]
        row: dict[str, Any] = {"bpw": bpw, "uniform_label": plan_label(plans["uniform"]),
                               "applied_choice": choice}
        for k, p in plans.items():
            row[k] = {"bpw": _bpw(p), **summarize(measured[k], idx)}
            if k != "uniform":
                row[k].update(compare(measured[k], base, idx))
        g = row["gptq-chosen"]
        row["target_met"] = bool(g["kl_ratio"]["value"] <= TARGET_RATIO and g["ppl_ratio"]["value"] <= 1.0)
        keep(row)
        say(f"  {bpw:g} bpw measured: KL / uniform {g['kl_ratio']['value']:.3f}")


# ---------------------------------------------------------------------------- b) llama.cpp
def llamacpp_part(bench: Bench, args: argparse.Namespace, idx: np.ndarray,
                  keep: Callable[[dict[str, Any]], None]) -> None:
    """Each preset against the ``run --for llamacpp`` plan of exactly its size, both ggml-applied."""
    from allocator.core.budget import Budget
    from allocator.export import llamacpp_preset_plan
    from allocator.model.quant import build_quantizer

    cfg = run_config(bench, "ggml", "llamacpp", args)
    quantizer = build_quantizer("ggml", bench.model, bench.units, list(bench.fit) if args.imatrix else (),
                                kind="causal_lm", importance=args.imatrix)
    # the preset rules read every weight module's shape, the head counts and the tying from the
    # loaded model (a bundled name such as smollm2 is no model directory to read them from)
    shapes, cfg_m = weight_shapes(bench.model), cast(Any, getattr(bench.model, "config", None))
    tied = bool(getattr(cfg_m, "tie_word_embeddings", False))
    t0 = time.perf_counter()
    table = without_types(table_for(bench, cfg, quantizer), args.drop_types)
    say(f"  llamacpp cost table: {time.perf_counter() - t0:.0f} s")
    done: list[tuple[dict[str, str], dict[str, Any]]] = []  # (preset plan's choice, its row)
    for preset in args.presets:
        pplan = llamacpp_preset_plan(shapes, preset, units=table.units, tied=tied,
                                     n_head=int(cfg_m.num_attention_heads),
                                     n_head_kv=int(getattr(cfg_m, "num_key_value_heads", None)
                                                   or cfg_m.num_attention_heads))
        same = next((r for choice, r in done if choice == dict(pplan.choice)), None)
        if same is not None:  # the fallbacks can make two presets one plan (Q2_K = Q3_K_S on SmolLM2)
            keep({**same, "preset_name": preset, "same_as": same["preset_name"]})
            say(f"  {preset} is the same plan as {same['preset_name']}: not measured again")
            continue
        size_bits = float(pplan.summary.size_bits)
        ours, _, _ = run_plan(bench, table, Budget(size_bytes=size_bits / 8), cfg, quantizer)
        p_m, o_m = bench.ggml(pplan, args.imatrix), bench.ggml(ours, args.imatrix)
        row: dict[str, Any] = {"preset_name": preset, "preset_bpw": round(size_bits / table.total_params, 4),
                               "preset_types": _counts(pplan.choice), "plan_types": _counts(ours.choice),
                               "preset": {"bpw": _bpw(pplan), **summarize(p_m, idx)},
                               "plan": {"bpw": _bpw(ours), **summarize(o_m, idx), **compare(o_m, p_m, idx)}}
        kl_r, ppl_r = row["plan"]["kl_ratio"]["value"], row["plan"]["ppl_ratio"]["value"]
        need = row["preset"]["kl"]["value"] > PRESET_KL_FLOOR
        row["target_met"] = bool(kl_r <= 1.0 and ppl_r <= 1.0 and (not need or kl_r <= TARGET_RATIO))
        done.append((dict(pplan.choice), row))
        keep(row)
        say(f"  {preset} measured: KL / preset {kl_r:.3f}")


def without_types(table: Any, types: Sequence[str]) -> Any:
    """``table`` without the options ``types`` (the presets keep them; only our plan loses them).

    On a model that ships as a GGUF of one type (SmolLM2: Q4_1), that type reproduces the weights
    exactly and a plan that may use it finds the file's own grid rather than allocating bits."""
    from allocator.core.errors import InvalidParameterError
    from allocator.core.table import CostTable

    if not types:
        return table
    unknown = sorted(set(types) - set(table.options))
    if unknown:
        raise InvalidParameterError(f"--drop-types {', '.join(unknown)}: not in the palette "
                                    f"({', '.join(table.options)})")
    df = table.df
    return CostTable(df[~df["option"].isin(list(types))].reset_index(drop=True), table.metadata)


def weight_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Module name → weight shape of every module with a 2-D weight (Linear, Embedding)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if getattr(m, "weight", None) is not None and m.weight.ndim == 2}


def _counts(choice: Mapping[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in choice.values():
        out[o] = out.get(o, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------- output
def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ci(d: Mapping[str, float], fmt: str = ".4g") -> str:
    return f"{d['value']:{fmt}} [{d['lo']:{fmt}}, {d['hi']:{fmt}}]"


def print_results(res: Mapping[str, Any]) -> None:
    fp = res["fp"]["perplexity"]
    print(f"\n### {res['model']}: {res['calib']} calibration / {res['evals']} held-out texts of "
          f"{res['seq_len']} tokens; fp perplexity {_ci(fp)}; 95 % bootstrap intervals over texts\n")
    if res["gptq"]:
        print("| bpw | plan | bpw | KL | perplexity | KL / uniform | ppl / uniform | target ≤ "
              f"{TARGET_RATIO}× KL, ppl ≤ 1× |")
        print("|---|---|---|---|---|---|---|---|")
        for r in res["gptq"]:
            for k in ("uniform", "gptq-chosen", "rtn-chosen"):
                if k not in r:
                    continue
                p = r[k]
                name = f"uniform GPTQ {r['uniform_label']}" if k == "uniform" else f"{k} (GPTQ-applied)"
                ratios = (f"{_ci(p['kl_ratio'], '.3f')} | {_ci(p['ppl_ratio'], '.4f')}"
                          if "kl_ratio" in p else "1 | 1")
                met = ("**met**" if r["target_met"] else "**not met**") if k == "gptq-chosen" else ""
                print(f"| {r['bpw']:g} | {name} | {p['bpw']} | {_ci(p['kl'])} | {_ci(p['perplexity'])} | "
                      f"{ratios} | {met} |")
        for r in res["gptq"]:
            a = r.get("applied_choice")
            if a:
                print(f"\n{r['bpw']:g} bpw, plans as GPTQ applies them, on {a['n_samples']} validation "
                      "texts: " + ", ".join(f"{c['label']} {c['error']:.4g}"
                                            + (f" (worse than uniform on {', '.join(c['worse_on'])})"
                                               if c["worse_on"] else "") for c in a["candidates"])
                      + f"; handed out: {a['chosen']}")
    if res["llamacpp"]:
        print("\n| preset | bpw | preset KL | preset ppl | plan bpw | plan KL | plan ppl | KL / preset | "
              f"ppl / preset | target (≤ 1×; ≤ {TARGET_RATIO}× KL if preset KL > {PRESET_KL_FLOOR}) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in res["llamacpp"]:
            p, o = r["preset"], r["plan"]
            print(f"| {r['preset_name']} | {r['preset_bpw']} | {_ci(p['kl'])} | {_ci(p['perplexity'])} | "
                  f"{o['bpw']} | {_ci(o['kl'])} | {_ci(o['perplexity'])} | {_ci(o['kl_ratio'], '.3f')} | "
                  f"{_ci(o['ppl_ratio'], '.4f')} | {'**met**' if r['target_met'] else '**not met**'} |")
        for r in res["llamacpp"]:
            same = f" (the same plan as {r['same_as']})" if r.get("same_as") else ""
            print(f"\n{r['preset_name']} types{same}: preset {r['preset_types']}; plan {r['plan_types']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS),
                    help="bpw of the GPTQ part (none: skip it)")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=PRESETS,
                    help="llama-quantize presets of the llama.cpp part (none: skip it)")
    ap.add_argument("--calib", type=int, default=128, help="calibration texts (run's default)")
    ap.add_argument("--evals", type=int, default=128, help="held-out texts (run's default)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--estimator", default="gauss-newton")
    ap.add_argument("--options", default=None,
                    help="candidate options of the GPTQ part (default: run's dense palette)")
    ap.add_argument("--drop-types", nargs="*", default=[],
                    help="GGUF types our llama.cpp plan may not use (e.g. q4_1 on SmolLM2, whose "
                         "file is Q4_1: the presets are not restricted)")
    ap.add_argument("--rounds", type=int, default=4, help="refinement rounds (run's default)")
    ap.add_argument("--refine-time", type=float, default=300.0, help="refinement seconds per plan")
    ap.add_argument("--no-imatrix", dest="imatrix", action="store_false",
                    help="llama.cpp part: no importance matrix (costs, refinement and both plans)")
    ap.add_argument("--no-rtn-chosen", action="store_true", help="skip the RTN-chosen GPTQ plan")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here (row by row, as measured)")
    ap.add_argument("--show", type=Path, help="print the tables of a saved --json file and exit")
    args = ap.parse_args(argv)
    if args.show:
        saved: dict[str, Any] = json.loads(args.show.read_text())
        print_results(saved)
        return saved
    t0 = time.perf_counter()
    bench = Bench(args.model, args.calib, args.evals, args.seq_len, args.seed)
    idx = resamples(bench.fp.n, args.bootstrap, args.seed)
    say(f"{args.model}: loaded, {len(bench.units)} units, reference on {bench.fp.n} texts")
    res: dict[str, Any] = {"model": args.model, "calib": args.calib, "evals": bench.fp.n,
                           "seq_len": args.seq_len, "estimator": args.estimator, "rounds": args.rounds,
                           "imatrix": args.imatrix, "drop_types": list(args.drop_types),
                           "bootstrap": args.bootstrap, "argv": sys.argv[1:] if argv is None else argv,
                           "fp": {"perplexity": percentile_interval(
                               float(bench.fp.value("perplexity_fp")),
                               np.asarray(bench.fp.value("perplexity_fp", idx))).to_dict()}}
    res["gptq"], res["llamacpp"] = [], []

    def keeper(part: str) -> Callable[[dict[str, Any]], None]:
        def keep(row: dict[str, Any]) -> None:  # each row saved as it is measured: a long run can stop
            res[part].append(row)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            if args.json:
                args.json.write_text(json.dumps(res, indent=1, default=str))
        return keep

    if args.budgets:
        gptq_part(bench, args, idx, keeper("gptq"))
    if args.presets:
        llamacpp_part(bench, args, idx, keeper("llamacpp"))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print_results(res)
    print(f"\n({args.model}: {res['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
    raise SystemExit(0)
