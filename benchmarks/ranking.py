"""Ranking at equal size: does the default cost table order plans *of one size* as they measure?

Issue 20, item 4. Over plans of a wide size range, size alone orders the measured errors, so a
Spearman correlation there says little about the table. Here every plan has the budget's size,
and the question is whether the table's predicted cost Σ_u c(u, o_u) ranks their measured
held-out errors.

**Equal size.** With C = ``Budget(bpw=B).size_cap_bits(N)`` (N weights in the budget), a plan is
of the budget's size when C − Δ < size ≤ C with Δ = ``--band`` bpw × N (default 0.01 bpw, 0.3 % of
3.25 bpw). Plans built here by promotion are filled until no unit's next-larger option fits, so
their slack is below one option step of one unit; each plan's bpw is printed, and so is the
Spearman correlation of size with measured error inside the set (near zero: size does not order
them). Plans outside the band are dropped and listed, never stretched.

**The table** is the one ``bitalloc run`` estimates by default: :func:`allocator.jobs.pipeline.run_spec`
(``DEFAULT_RUN_ESTIMATOR`` = gauss-newton, its default samples / sequence length, batch size
``DEFAULT_RUN_BATCH_SIZE``, the dense palette) through :func:`allocator.jobs.pipeline.estimate_table`
on the fit share of the run's calibration batches (24 of 32 texts; the validation share is run's
judge of candidates, not an estimate input) and the run's units (inert units left out). The
"calibration" error of ``--diagnose`` is measured on that fit share.

**The plans** (duplicates dropped):

* ``optimum``: the exact optimum of the table at B (mckp);
* ``perturbed-k``: optima of the table with every cost multiplied by exp(σ z), z ~ N(0, 1) per
  (unit, option), σ = ``--sigma`` (0.7), seeds 1, 2, …, until ``--perturbed`` distinct plans;
* ``greedy``: the greedy solver's plan on the table;
* ``uniform``: each uniform option whose size is in the band (int3-g128-asym at 3.25, …);
* ``rule``: a llama.cpp-style mix on the int-g128-asym ladder: from the rung below the largest
  uniform that fits, attention-value / FFN-down projections up one rung then two, then the first
  and last blocks up one, then the rest up one in order while the budget allows, then filled;
* ``rule from O``: the same rule from the largest uniform option O below the band (int3-g128-sym
  at 3.25), promoting to the ladder's rungs of more bits (a Q3_K_M-like mix: few units bumped);
* ``random-k``: ``--random`` plans promoted from the same base rung in a random order by random
  1–2 rungs, then filled in random order.

Every plan's predicted cost is read from the unperturbed table. Each plan is applied with RTN
(:func:`allocator.backend.apply_plan`) and evaluated on held-out data (the corpus' evaluation
split, or ``--eval-data``) with :func:`allocator.backend.evaluate`, error metric as ``run`` reports
it (KL for logits, 1 − cos for embeddings). Printed: Spearman ρ of predicted cost vs measured
error with a percentile bootstrap interval over plans, Kendall τ, ρ over the table-derived plans
alone (optimum + perturbed, the issue's set), and each plan's ratio to the uniform plan of the
budget's size measured in the same run.

``--diagnose`` (and ``--measured-table``) separate the causes of a low ρ: (a) the plans' joint
error measured on the calibration data the table was estimated on (ρ of predicted vs calibration
error: the table on its own data; ρ of calibration vs held-out error: what any calibration-data
predictor could reach); (b) with ``--measured-table``, a ``measured`` table (each unit alone
at each option, on the calibration data): ρ of its additive sum vs held-out error — high while
the default table's is low points at the estimator, low as well points at the additive model
(units interact); (c) split-half: ρ between the errors measured on the odd and on the even
evaluation batches (the noise of the measurement itself).

    PYTHONPATH=. python benchmarks/ranking.py --models minilm tiny-llama --budgets 3.25 4.25 \\
        --diagnose --measured-table --json ranking.json
    PYTHONPATH=. python benchmarks/ranking.py --models smollm2 --budgets 3.25 --evals 32
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUDGETS = (3.25, 4.25)
#: the rule mix's ladder (llama.cpp's K-quants step by one bit at one group size)
LADDER = tuple(f"int{b}-g128-asym" for b in (2, 3, 4, 5, 6, 8))
#: attention-value and FFN-down projections (Llama, BERT, GPT-2 / OPT / Falcon names)
_VDOWN = re.compile(r"(v_proj|\.value$|down_proj|output\.dense$|fc2|w2|c_proj)")
_BLOCK = re.compile(r"\.(\d+)\.")


# ---------------------------------------------------------------------------- pure plan builders
def tie_groups(table: Any) -> dict[str, list[str]]:
    """group → its units: a tie id's units (they must share one option: fused q/k/v, gate/up),
    else the unit alone. The builders move groups, never half of one."""
    df = table.df
    ties = df["tie"] if "tie" in df.columns else [""] * len(df)
    out: dict[str, list[str]] = {}
    for u, t in dict(zip(df["unit"], ties, strict=True)).items():
        out.setdefault(str(t) if t else str(u), []).append(str(u))
    return out


def group_sizes(table: Any) -> dict[str, dict[str, float]]:
    """group → option → Σ size_bits over its units (options every unit of the group offers)."""
    per_unit: dict[str, dict[str, float]] = {}
    df = table.df
    for u, o, s in zip(df["unit"], df["option"], df["size_bits"], strict=True):
        per_unit.setdefault(str(u), {})[str(o)] = float(s)
    out = {}
    for g, units in tie_groups(table).items():
        opts = set.intersection(*(set(per_unit[u]) for u in units))
        out[g] = {o: sum(per_unit[u][o] for u in units) for o in per_unit[units[0]] if o in opts}
    return out


def expand(table: Any, choice: Mapping[str, str]) -> dict[str, str]:
    """group → option to unit → option."""
    return {u: choice[g] for g, units in tie_groups(table).items() for u in units}


def plan_size(sizes: Mapping[str, Mapping[str, float]], choice: Mapping[str, str]) -> float:
    """size(P) = Σ_g size(g, o_g) in bits."""
    return float(sum(sizes[g][o] for g, o in choice.items()))


def size_band(cap_bits: float, total_params: int, band_bpw: float) -> tuple[float, float]:
    """The equal-size band (C − Δ, C] in bits, Δ = band_bpw · N; C carries the size tolerance of
    the central plan check so a plan of exactly the budget is inside."""
    if not band_bpw > 0:
        raise ValueError(f"band must be > 0 bpw, got {band_bpw!r}")
    return cap_bits - band_bpw * total_params, cap_bits * (1 + 1e-9)


def in_band(size: float, band: tuple[float, float]) -> bool:
    return band[0] < size <= band[1]


def fill(sizes: Mapping[str, Mapping[str, float]], choice: Mapping[str, str], cap_bits: float,
         order: Sequence[str]) -> dict[str, str]:
    """Upgrade groups, in ``order``, to their next-larger option while it fits, until none does.

    After it, for every group g, size(P) + (s_next(g) − s(g, o_g)) > C: the slack is below the
    smallest option step of any group."""
    out = dict(choice)
    total = plan_size(sizes, out)
    changed = True
    while changed:
        changed = False
        for g in order:
            cur = sizes[g][out[g]]
            bigger = [(s, o) for o, s in sizes[g].items() if s > cur]
            if not bigger:
                continue
            s, o = min(bigger)
            if total + s - cur <= cap_bits:
                out[g], total, changed = o, total + s - cur, True
    return out


def ladder_rungs(sizes: Mapping[str, Mapping[str, float]], ladder: Sequence[str] = LADDER) -> list[str]:
    """The ladder's options every group offers, smallest first."""
    return [o for o in ladder if all(o in opts for opts in sizes.values())]


def base_rung(sizes: Mapping[str, Mapping[str, float]], rungs: Sequence[str], cap_bits: float) -> int | None:
    """Index of the rung below the largest uniform rung that fits (the rung itself when it is
    the lowest); None when not even the lowest fits."""
    fits = [i for i, o in enumerate(rungs) if plan_size(sizes, dict.fromkeys(sizes, o)) <= cap_bits]
    return None if not fits else max(0, max(fits) - 1)


def _block(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m[1]) if m else None


def rule_mix(table: Any, cap_bits: float, ladder: Sequence[str] = LADDER,
             base_option: str | None = None) -> dict[str, str] | None:
    """llama.cpp-style mix (module docstring) filled to the cap, unit → option; None when it
    cannot be built (no ladder rung fits, or none above the base). ``base_option``: start from
    this uniform option instead, promoting to the ladder's rungs of more bits."""
    sizes = group_sizes(table)
    rungs = ladder_rungs(sizes, ladder)
    base = base_rung(sizes, rungs, cap_bits)
    if base_option is not None:
        from allocator.core.formats import parse_format

        if not all(base_option in opts for opts in sizes.values()):
            return None
        bits = parse_format(base_option).bits
        rungs = [base_option] + [o for o in rungs if parse_format(o).bits > bits]
        base = 0 if plan_size(sizes, dict.fromkeys(sizes, base_option)) <= cap_bits else None
    if base is None or base + 1 >= len(rungs):
        return None
    members = tie_groups(table)
    names = list(sizes)
    blocks = sorted({b for g in names for u in members[g] if (b := _block(u)) is not None})
    edges = {blocks[0], blocks[-1]} if blocks else set()
    vdown = [g for g in names if any(_VDOWN.search(u) for u in members[g])]
    edge = [g for g in names if g not in vdown and any(_block(u) in edges for u in members[g])]
    rest = [g for g in names if g not in vdown and g not in edge]
    steps = [(g, 1) for g in vdown] + [(g, 2) for g in vdown] + [(g, 1) for g in edge + rest]
    return expand(table, _promote(sizes, rungs, base, steps, cap_bits, order=vdown + edge + rest))


def random_mix(table: Any, cap_bits: float, rng: np.random.Generator,
               ladder: Sequence[str] = LADDER) -> dict[str, str] | None:
    """Promotions from the base rung by 1–2 rungs in a random order, filled in a random order."""
    sizes = group_sizes(table)
    rungs = ladder_rungs(sizes, ladder)
    base = base_rung(sizes, rungs, cap_bits)
    if base is None or base + 1 >= len(rungs):
        return None
    names = list(sizes)
    order = [names[i] for i in rng.permutation(len(names))]
    steps = [(g, int(rng.integers(1, 3))) for g in order]
    fill_order = [names[i] for i in rng.permutation(len(names))]
    return expand(table, _promote(sizes, rungs, base, steps, cap_bits, order=fill_order))


def _promote(sizes: Mapping[str, Mapping[str, float]], rungs: Sequence[str], base: int,
             steps: Sequence[tuple[str, int]], cap_bits: float, order: Sequence[str]) -> dict[str, str]:
    """Uniform base rung, then each (group, +k rungs) step that fits, then :func:`fill`."""
    choice = dict.fromkeys(sizes, rungs[base])
    total = plan_size(sizes, choice)
    for g, k in steps:
        target = rungs[min(base + k, len(rungs) - 1)]
        extra = sizes[g][target] - sizes[g][choice[g]]
        if extra > 0 and total + extra <= cap_bits:
            choice[g], total = target, total + extra
    return fill(sizes, choice, cap_bits, order)


def perturbed_table(table: Any, sigma: float, seed: int) -> Any:
    """The table with c'(u, o) = c(u, o) · exp(σ z_{u,o}), z ~ N(0, 1) i.i.d. (log-normal noise)."""
    from allocator.core.table import CostTable

    if not sigma >= 0:
        raise ValueError(f"sigma must be ≥ 0, got {sigma!r}")
    df = table.df.copy()
    z = np.random.default_rng(seed).standard_normal(len(df))
    df["cost"] = df["cost"].to_numpy() * np.exp(sigma * z)
    return CostTable(df, table.metadata)


def build_plans(table: Any, bpw: float, *, sigma: float = 0.7, perturbed: int = 10, random: int = 2,
                band_bpw: float = 0.01, seed: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """The equal-size plan set at ``bpw`` (module docstring): (label → BitPlan on ``table``,
    label → why it was dropped). Every kept plan is distinct and in the band."""
    import solvers
    from allocator.core.budget import Budget
    from allocator.core.formats import parse_format
    from allocator.core.plan import BitPlan

    budget = Budget(bpw=bpw)
    cap = budget.size_cap_bits(table.total_params)
    band = size_band(cap, table.total_params, band_bpw)
    sizes = group_sizes(table)
    unit_of = {units[0]: g for g, units in tie_groups(table).items()}
    kept: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    seen: dict[tuple[tuple[str, str], ...], str] = {}

    def offer(label: str, choice: Mapping[str, str] | None) -> bool:
        if choice is None:
            dropped[label] = "cannot be built at this budget"
            return False
        key = tuple(sorted(choice.items()))
        size = plan_size(sizes, {g: choice[u] for u, g in unit_of.items()})
        if key in seen:
            dropped[label] = f"same plan as {seen[key]}"
        elif not in_band(size, band):
            dropped[label] = f"{size / table.total_params:.4f} bpw is outside the band"
        else:
            seen[key] = label
            kept[label] = BitPlan.from_choice(table, choice)
            return True
        return False

    res = solvers.solve(table, budget)
    offer("optimum", res.plan.choice if res.plan is not None else None)
    found, s = 0, 0
    while found < perturbed and s < 4 * perturbed + 8:
        s += 1
        p = solvers.solve(perturbed_table(table, sigma, seed + s), budget).plan
        found += offer(f"perturbed-{s}", p.choice if p is not None else None)
    g = solvers.solve(table, budget, solver="greedy").plan
    offer("greedy", g.choice if g is not None else None)
    for o in table.options:
        if all(o in opts for opts in sizes.values()) and in_band(plan_size(sizes, dict.fromkeys(sizes, o)),
                                                                  band):
            offer(f"uniform {o}", dict.fromkeys(table.units, o))
    offer("rule", rule_mix(table, cap))
    below = [(plan_size(sizes, dict.fromkeys(sizes, o)), o) for o in table.options
             if parse_format(o).is_quantized and all(o in opts for opts in sizes.values())]
    below = [b for b in below if b[0] <= band[0]]
    if below:
        base = max(below)[1]
        offer(f"rule from {base}", rule_mix(table, cap, base_option=base))
    rng = np.random.default_rng(seed + 10_000)
    for k in range(1, random + 1):
        offer(f"random-{k}", random_mix(table, cap, rng))
    return kept, dropped


# ---------------------------------------------------------------------------- statistics
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import kendalltau

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(kendalltau(a, b).statistic)


def bootstrap_rho(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of Spearman ρ over plans resampled with replacement (resamples
    with fewer than 3 distinct plans are skipped)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if len(set(i.tolist())) >= 3:
            r = spearman(x[i].tolist(), y[i].tolist())
            if np.isfinite(r):
                vals.append(r)
    if not vals:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def parse_estimator(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` → (name, parameters), values read as
    ``bitalloc estimate --param`` reads them (JSON where it parses, else a string)."""
    from sensitivity import parse_estimator_params

    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"no estimator name in {text!r}")
    return name, parse_estimator_params([item for item in rest.split(",") if item])


# ---------------------------------------------------------------------------- measurement
class Bench:
    """One model as ``bitalloc run`` sees it: its calibration and held-out batches, its units,
    its default table, and plan evaluation (RTN) with the full-precision weights restored."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        from allocator.backend import reference_outputs
        from allocator.core.units import discover_units
        from allocator.jobs.pipeline import RunConfig, run_spec
        from allocator.model.data import user_data_for
        from allocator.model.data.split import split_calibration
        from allocator.model.loading import load_model
        from allocator.model.unit_select import select_units

        self.loaded = load_model(name)
        self.model = self.loaded.model.eval()
        self.kind = str(self.loaded.kind)
        fields: dict[str, Any] = {"progress": False, "seed": args.seed}
        if args.calib is not None:
            fields["samples"] = args.calib
        self.cfg = RunConfig(model=name, estimate=run_spec(**fields), eval_samples=args.evals,
                             eval_data=args.eval_data, out=None)
        spec = self.cfg.estimate
        common: dict[str, Any] = {"seq_len": spec.seq_len, "batch_size": spec.batch_size,
                                  "seed": spec.seed, "data": None, "eval_data": args.eval_data}
        calib_data = user_data_for(self.loaded, "calibration", spec.samples, **common)
        # run estimates on the fit share (the validation share judges candidates and moves)
        self.calib_data = calib_data if self.cfg.validation_share == 0 else \
            split_calibration(calib_data, self.cfg.validation_share).fit
        self.calib = list(self.calib_data)
        self.held = list(user_data_for(self.loaded, "evaluation", args.evals, **common))
        found = discover_units(self.model, kinds=spec.kinds, group_columns=spec.groups)
        self.units = list(select_units(self.loaded, found, batch=self.calib[0]).units)
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.refs: dict[str, Any] = {}
        self.sets: dict[str, list[Any]] = {"held-out": self.held, "calibration": self.calib,
                                           "odd": self.held[1::2], "even": self.held[0::2]}
        # split-half needs ≥ 2 held-out batches; the halves then give the held-out error as well
        self.halves = args.diagnose and len(self.held) >= 2
        self.sets_measured = (["odd", "even"] if self.halves else ["held-out"]) + (
            ["calibration"] if args.diagnose else [])
        for key in self.sets_measured:
            self.refs[key] = reference_outputs(self.model, self.sets[key], kind=self.kind)
        self.cache: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        self.metric = "error"

    def table(self, cache: Path | None, method: str | None = None) -> Any:
        """The run's default table (or ``method``'s, ``NAME[:KEY=VALUE,…]``, same settings
        otherwise); read from / saved to ``cache`` (a folder) when given, keyed by model, method,
        its parameters, samples and seed."""
        import dataclasses
        import hashlib

        from allocator.core.table import CostTable
        from allocator.jobs.pipeline import estimate_table

        cfg = self.cfg
        if method is not None:
            name, params = parse_estimator(method)
            cfg = dataclasses.replace(self.cfg, estimate=dataclasses.replace(
                self.cfg.estimate, method=name, params={**dict(self.cfg.estimate.params or {}), **params}))
        spec = cfg.estimate
        tag = hashlib.sha256(json.dumps(dict(spec.params or {}), sort_keys=True, default=str)
                             .encode()).hexdigest()[:8]
        path = None if cache is None else cache / (
            f"{self.cfg.model}-{spec.method}-{tag}-{self.calib_data.n_samples}of{spec.samples}x{spec.seq_len}"
            f"-seed{spec.seed}.parquet")
        if path is not None and path.is_file():
            return CostTable.load(path)
        table = estimate_table(self.loaded, self.calib_data, cfg, self.units)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            table.save(path)
        return table

    def errors(self, plan: Any) -> dict[str, float]:
        """Measured error of ``plan`` (applied once) on the held-out data and, when diagnosing, on
        its odd and even batches and on the calibration batches. From two halves the held-out
        error is their weighted mean e = Σ_h w_h e_h / Σ_h w_h (w: tokens for KL, samples for
        1 − cos), which is what :func:`allocator.backend.evaluate` gives on all batches at once."""
        from allocator.backend import apply_plan, evaluate

        key = tuple(sorted(plan.choice.items()))
        if key not in self.cache:
            self.model.load_state_dict(self.state)
            apply_plan(self.model, plan, method="rtn", units=self.units)
            self.cache[key] = {s: evaluate(self.model, self.sets[s], self.refs[s])
                               for s in self.sets_measured}
            self.model.load_state_dict(self.state)
        reps = self.cache[key]
        self.metric = next(iter(reps.values())).error_metric
        out = {s: float(r.error) for s, r in reps.items()}
        if self.halves:
            w = {h: float(reps[h].n_tokens or reps[h].n_samples) for h in ("odd", "even")}
            out["held-out"] = sum(w[h] * out[h] for h in w) / sum(w.values())
        return out


def rank_budget(bench: Bench, table: Any, others: Mapping[str, Any], bpw: float,
                args: argparse.Namespace) -> dict[str, Any]:
    """Build the plans from ``table``, measure them, and rank them by ``table``'s predicted cost
    and by each of ``others`` (estimator → its table: its additive sum over the same plans)."""
    from allocator.core.plan import BitPlan

    plans, dropped = build_plans(table, bpw, sigma=args.sigma, perturbed=args.perturbed,
                                 random=args.random, band_bpw=args.band, seed=args.seed)
    rows = []
    for label, plan in plans.items():
        t0 = time.perf_counter()
        err = bench.errors(plan)
        row = {"label": label, "bpw": plan.summary.bpw, "predicted": plan.summary.predicted_cost,
               "seconds": time.perf_counter() - t0, **err}
        row["predicted_by"] = {e: BitPlan.from_choice(t, plan.choice).summary.predicted_cost
                               for e, t in others.items()}
        rows.append(row)
        print(f"  {label:<30} {row['bpw']:.4f} bpw  predicted {row['predicted']:.4g}  held-out "
              f"{row['held-out']:.4g}", file=sys.stderr, flush=True)
    uni = next((r["held-out"] for r in rows if r["label"].startswith("uniform int")
                and r["label"].endswith("g128-asym")), None)
    for r in rows:
        r["x_uniform"] = r["held-out"] / uni if uni else None
    return {"bpw": bpw, "rows": rows, "dropped": dropped, "stats": rank_stats(rows, args)}


def rank_stats(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def col(name: str, sel: Callable[[Mapping[str, Any]], bool] = lambda r: True) -> list[float]:
        return [float(r[name]) for r in rows if sel(r)]

    pred, held = col("predicted"), col("held-out")
    lo, hi = bootstrap_rho(pred, held, args.bootstrap, args.seed)

    def derived(r: Mapping[str, Any]) -> bool:
        return bool(r["label"] == "optimum" or r["label"].startswith("perturbed"))

    out: dict[str, Any] = {
        "n": len(rows), "spearman": spearman(pred, held), "ci": [lo, hi], "kendall": kendall(pred, held),
        "n_table_derived": len(col("predicted", derived)),
        "spearman_table_derived": spearman(col("predicted", derived), col("held-out", derived)),
        "spearman_size": spearman(col("bpw"), held),
        "bpw_range": [min(col("bpw")), max(col("bpw"))] if rows else None}
    if rows and "calibration" in rows[0]:
        cal = col("calibration")
        out["diagnose"] = {
            "predicted_vs_calibration": spearman(pred, cal),
            "calibration_vs_held_out": spearman(cal, held),
            "split_half": spearman(col("odd"), col("even")) if "odd" in rows[0] else float("nan")}
    out["others"] = {}
    for e in (rows[0]["predicted_by"] if rows else {}):
        by = [float(r["predicted_by"][e]) for r in rows]
        by_derived = [float(r["predicted_by"][e]) for r in rows if derived(r)]
        out["others"][e] = {"spearman": spearman(by, held),
                            "ci": list(bootstrap_rho(by, held, args.bootstrap, args.seed)),
                            "spearman_table_derived": spearman(by_derived, col("held-out", derived))}
    return out


# ---------------------------------------------------------------------------- output
def print_budget(model: str, metric: str, res: Mapping[str, Any]) -> None:
    st = res["stats"]
    first = res["rows"][0] if res["rows"] else {}
    extra = [c for c in ("calibration", "odd", "even") if c in first]
    others = list(first.get("predicted_by", {}))
    print(f"\n### {model}, {res['bpw']:g} bpw ({metric}; {st['n']} plans, "
          f"{st['bpw_range'][0]:.4f}–{st['bpw_range'][1]:.4f} bpw)\n")
    head = "| plan | bpw | predicted cost | held-out | × uniform |" + "".join(
        f" {c.replace('_', ' ')} |" for c in extra) + "".join(f" {e} predicted |" for e in others)
    print(head)
    print("|" + "---|" * head.count(" |"))
    for r in sorted(res["rows"], key=lambda r: r["predicted"]):
        x = f"{r['x_uniform']:.3f}×" if r["x_uniform"] is not None else "–"
        print(f"| {r['label']} | {r['bpw']:.4f} | {r['predicted']:.4g} | {r['held-out']:.4g} | {x} |"
              + "".join(f" {r[c]:.4g} |" for c in extra)
              + "".join(f" {r['predicted_by'][e]:.4g} |" for e in others))
    print(f"\nSpearman ρ (predicted vs held-out) **{st['spearman']:.2f}** [{st['ci'][0]:.2f}, "
          f"{st['ci'][1]:.2f}] over {st['n']} plans, Kendall τ {st['kendall']:.2f}; table-derived "
          f"plans only (optimum + perturbed, n = {st['n_table_derived']}): "
          f"{st['spearman_table_derived']:.2f}; size vs held-out: "
          + (f"{st['spearman_size']:.2f}" if np.isfinite(st["spearman_size"]) else "– (one size)"))
    if "diagnose" in st:
        d = st["diagnose"]
        print(f"Diagnose: ρ predicted vs calibration {d['predicted_vs_calibration']:.2f}, calibration vs "
              f"held-out {d['calibration_vs_held_out']:.2f}, split-half held-out {d['split_half']:.2f}")
    for e, o in st.get("others", {}).items():
        print(f"Ranked by the {e} table instead (the same plans): ρ **{o['spearman']:.2f}** "
              f"[{o['ci'][0]:.2f}, {o['ci'][1]:.2f}], table-derived plans {o['spearman_table_derived']:.2f}")
    for label, why in res["dropped"].items():
        print(f"- dropped {label}: {why}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm", "tiny-llama"])
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--calib", type=int, default=None, help="calibration texts (default: run's default)")
    ap.add_argument("--evals", type=int, default=128, help="held-out texts (run's default: 128)")
    ap.add_argument("--eval-data", default=None, help="held-out text file instead of the corpus' split")
    ap.add_argument("--sigma", type=float, default=0.7, help="log-normal perturbation of the costs")
    ap.add_argument("--perturbed", type=int, default=10, help="distinct perturbed-table optima")
    ap.add_argument("--random", type=int, default=2, help="random promoted mixes")
    ap.add_argument("--band", type=float, default=0.01, help="equal-size band below the budget (bpw)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over plans")
    ap.add_argument("--diagnose", action="store_true",
                    help="each plan's calibration error and split-half held-out errors")
    ap.add_argument("--estimator", default=None,
                    help="the table the plans come from and are ranked by (default: run's estimator); "
                         "NAME or NAME:KEY=VALUE,… (e.g. gauss-newton:correlations=unit)")
    ap.add_argument("--compare", nargs="*", default=[],
                    help="estimators (NAME[:KEY=VALUE,…]) whose tables also rank the same plans "
                         "(one more estimate each)")
    ap.add_argument("--measured-table", action="store_true",
                    help="also a measured table's additive sum per plan (same as --compare measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder for the estimated tables (reused by a later run with the same settings)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from allocator.jobs.pipeline import DEFAULT_RUN_ESTIMATOR

    estimator = args.estimator or DEFAULT_RUN_ESTIMATOR
    compare = list(dict.fromkeys([*args.compare, *(["measured"] if args.measured_table else [])]))

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "models": []}
    for name in args.models:
        t0 = time.perf_counter()
        bench = Bench(name, args)
        table = bench.table(args.cache, estimator)
        est_s = time.perf_counter() - t0
        others = {e: bench.table(args.cache, e) for e in compare if e != estimator}
        entry: dict[str, Any] = {"model": name, "kind": bench.kind, "estimator": estimator,
                                 "units": table.n_units, "options": len(table.options),
                                 "setup_seconds": est_s, "budgets": []}
        for bpw in args.budgets:
            res = rank_budget(bench, table, others, bpw, args)
            entry["budgets"].append(res)
            entry["metric"] = bench.metric
            print_budget(name, bench.metric, res)
        entry["seconds"] = time.perf_counter() - t0
        print(f"({name}: {entry['seconds']:.0f} s)", flush=True)
        results["models"].append(entry)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
    raise SystemExit(0)
