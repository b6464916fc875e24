"""report.md / results.json / the CLI: every metric with its interval, and the flag when the handed-out
plan is worse than the uniform plan that fits on some metric beyond its interval."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from allocator.backend import EvalReport, RatioMetric, SampleStats, Transform
from allocator.core.plan import BitPlan
from allocator.core.table import CostTable
from allocator.jobs.pipeline import PlanResult, RunConfig, RunResult
from allocator.jobs.report import UNIFORM_PLAN_FILE, regression_warnings, report_markdown, run_summary

N = 64  # evaluation texts

CAUSAL = {"perplexity": RatioMetric(numerator="nll", denominator="targets", transform=Transform.EXP),
          "perplexity_fp": RatioMetric(numerator="nll_fp", denominator="targets", transform=Transform.EXP,
                                       compare=False),
          "kl": RatioMetric(numerator="kl", denominator="tokens")}
ENCODER = {"cosine": RatioMetric(numerator="cos_distance", denominator="count",
                                 transform=Transform.COMPLEMENT, higher_is_better=True, compare=False),
           "cos_distance": RatioMetric(numerator="cos_distance", denominator="count"),
           "retrieval@5": RatioMetric(numerator="hit", denominator="query", higher_is_better=True)}


def _table() -> CostTable:
    return CostTable.from_unit_costs(units=["a", "b"], params=[4096, 4096],
                                     options=["int2-g128-asym", "int4-g128-asym"],
                                     cost=[[1.0, 0.1], [1.0, 0.1]])


def _report(kind: str, error_metric: str, metrics: dict[str, RatioMetric],
            cols: dict[str, np.ndarray]) -> EvalReport:
    s = SampleStats(columns=cols, metrics=metrics)
    return EvalReport(kind=kind, metrics=s.values(), error_metric=error_metric, n_samples=s.n, samples=s)


def _run(chosen: EvalReport, uniform: EvalReport, kind: str) -> RunResult:
    t = _table()
    ub = PlanResult(label="uniform ≤", plan=BitPlan.from_choice(t, dict.fromkeys(t.units, "int2-g128-asym")),
                    report=uniform, verified=True)
    mixed_plan = BitPlan.from_choice(t, {"a": "int4-g128-asym", "b": "int2-g128-asym"})
    mixed = PlanResult(label="mixed", plan=mixed_plan, report=chosen, verified=True)
    return RunResult(config=RunConfig(out=None), model_kind=kind, table=t, mixed=mixed, uniform_below=ub,
                     uniform_above=None, seconds={"load": 1.0})


def _causal(ppl_factor: float, noise: float = 0.0) -> RunResult:
    """Per text: the chosen plan's KL 0.8× uniform's; its NLL ``ppl_factor``× uniform's (times
    1 + N(0, ``noise``²) of its own)."""
    rng = np.random.default_rng(0)
    difficulty = rng.lognormal(0.0, 0.5, N)
    tokens = np.full(N, 128.0)
    nll = 128 * 3.0 * difficulty * rng.normal(1, 0.002, N)
    base = {"tokens": tokens, "targets": tokens - 1, "nll_fp": nll * 0.95}
    uniform = _report("causal_lm", "kl", CAUSAL, {**base, "kl": 0.1 * tokens * difficulty, "nll": nll})
    chosen = _report("causal_lm", "kl", CAUSAL, {**base, "kl": 0.08 * tokens * difficulty,
                                                 "nll": nll * ppl_factor * rng.normal(1, noise, N)})
    return _run(chosen, uniform, "causal_lm")


def test_a_plan_better_in_kl_but_worse_in_perplexity_is_flagged() -> None:
    run = _causal(1.02)
    assert run.error_ratio == pytest.approx(0.8) and not run.worse_than_uniform
    assert [c.metric for c in run.regressions] == ["perplexity"]
    md = report_markdown(run)
    flag = next(line for line in md.splitlines() if line.startswith("**Warning: the chosen plan is worse"))
    assert "on perplexity beyond its 95 % interval" in flag and "chosen on kl" in flag
    c = run.vs_uniform["perplexity"]
    assert c.a.text() in flag and c.b.text() in flag and "uniform" in flag and flag.endswith("**")
    assert "| perplexity | lower |" in md and "**worse**" in md
    # every metric of every plan carries its interval, in the report and in results.json
    assert f"{run.mixed.report.metrics['kl']:.4g} [" in md
    res = json.loads(json.dumps(run_summary(run)))
    assert res["worse_than_uniform_on"] == ["perplexity"]
    assert res["vs_uniform"]["kl"]["verdict"] == "better"
    assert res["vs_uniform"]["perplexity"]["verdict"] == "worse"
    assert set(res["vs_uniform"]) == {"perplexity", "kl"}  # the fp perplexity is no comparison
    for row in res["rows"]:
        assert set(row["intervals"]) == set(row["metrics"])
        assert all(i["lo"] <= i["value"] <= i["hi"] for i in row["intervals"].values())


def test_no_flag_when_no_metric_is_worse_beyond_its_interval() -> None:
    run = _causal(0.99)
    assert run.regressions == [] and regression_warnings(run) == []
    md = report_markdown(run)
    assert "**Warning" not in md and "**worse**" not in md
    assert "No metric of the chosen plan is worse than the uniform plan's beyond its 95 % interval." in md


def test_a_worse_point_estimate_within_its_interval_is_said_but_not_flagged() -> None:
    run = _causal(1.005, noise=0.02)
    c = run.vs_uniform["perplexity"]
    assert c.delta.value > 1 and c.delta.lo < 1 < c.delta.hi and not run.regressions
    md = report_markdown(run)
    assert "| within the interval (point estimate worse) |" in md and "**Warning" not in md


def test_an_encoder_worse_in_retrieval_is_flagged(tmp_path: Path) -> None:
    from allocator.jobs.report import write_outputs

    rng = np.random.default_rng(1)
    d = rng.lognormal(-3, 0.5, N)
    hit = np.clip(rng.normal(0.7, 0.1, N), 0, 1)
    common = {"count": np.ones(N), "query": np.ones(N)}
    uniform = _report("encoder", "cos_distance", ENCODER, {**common, "cos_distance": d, "hit": hit})
    chosen = _report("encoder", "cos_distance", ENCODER,
                     {**common, "cos_distance": 0.8 * d, "hit": hit - 0.05})
    run = _run(chosen, uniform, "encoder")
    assert [c.metric for c in run.regressions] == ["retrieval@5"]  # higher is better: lower is worse
    assert run.vs_uniform["cos_distance"].better
    front = SimpleNamespace(bpw=np.array([2.0, 4.0]), cost=np.array([1.0, 0.1]))
    written = write_outputs(run, front, tmp_path)
    alternative = tmp_path / UNIFORM_PLAN_FILE
    assert alternative.is_file() and written.files["plan_uniform"] == alternative
    assert BitPlan.load(alternative).choice == run.uniform_below.plan.choice  # type: ignore[union-attr]
    md = (tmp_path / "report.md").read_text()
    assert ("**Warning: the chosen plan is worse than the uniform plan that fits (int2-g128-asym) on "
            "retrieval@5") in md
    assert f"written to `{UNIFORM_PLAN_FILE}`" in md
    # a later run in the same folder that is not flagged removes the stale alternative
    write_outputs(_causal(0.99), front, tmp_path)
    assert not (tmp_path / UNIFORM_PLAN_FILE).exists()


def test_the_cli_prints_the_flag() -> None:
    from rich.console import Console

    from allocator.cli._run import _print_vs_uniform

    con = Console(record=True, width=200)
    _print_vs_uniform(con, _causal(1.02))
    text = con.export_text()
    assert "paired 95 % intervals: perplexity ratio 1.07 [" in text and "(worse)" in text
    assert "warning: the chosen plan is worse than the uniform plan that fits" in text
    assert "on perplexity" in text
    con = Console(record=True, width=200)
    _print_vs_uniform(con, _causal(0.99))
    assert "warning" not in con.export_text()
