"""The choice among plans applied as the backend applies them (allocator.jobs.applied)."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.backend import Contrast, RatioMetric, SampleStats, paired_comparison, resamples
from allocator.core.errors import InvalidParameterError
from allocator.jobs.applied import AppliedCandidate, choose


def _stats(kl: list[float]) -> SampleStats:
    return SampleStats(columns={"kl": np.asarray(kl), "tokens": np.ones(len(kl))},
                       metrics={"kl": RatioMetric(numerator="kl", denominator="tokens")})


def _candidate(label: str, kl: list[float], uniform: list[float] | None) -> AppliedCandidate:
    mine = _stats(kl)
    comps = {} if uniform is None else paired_comparison(mine, _stats(uniform), resamples(len(kl)))
    return AppliedCandidate(label=label, error=float(np.mean(kl)), metrics={"kl": float(np.mean(kl))},
                            vs_uniform=comps)


def test_lowest_error_wins_among_plans_not_worse_than_uniform() -> None:
    rng = np.random.default_rng(0)
    base = list(1.0 + 0.1 * rng.random(40))
    better = [x * 0.8 for x in base]
    worse = [x * 1.3 for x in base]
    cands = [_candidate("refined", worse, base), _candidate("table optimum", better, base),
             _candidate("uniform ≤", base, None)]
    assert cands[0].worse_on == ["kl"] and not cands[1].worse_on
    assert cands[1].vs_uniform["kl"].contrast is Contrast.RATIO
    assert choose(cands) == "table optimum"


def test_a_plan_worse_on_another_metric_is_ruled_out_even_with_the_lowest_error() -> None:
    rng = np.random.default_rng(1)
    base = list(1.0 + 0.1 * rng.random(40))
    low = _candidate("refined", [x * 0.5 for x in base], base)
    # the same plan, with a second metric on which it loses beyond the interval
    worse_ppl = paired_comparison(_stats([x * 1.5 for x in base]), _stats(base), resamples(40))
    low = AppliedCandidate(label=low.label, error=low.error, metrics=low.metrics,
                           vs_uniform={**low.vs_uniform, "perplexity": worse_ppl["kl"]})
    assert low.worse_on == ["perplexity"]
    assert choose([low, _candidate("uniform ≤", base, None)]) == "uniform ≤"


def test_a_plan_behind_uniform_on_another_metric_is_ruled_out_within_the_interval() -> None:
    # lower KL, but a perplexity point estimate above uniform's (inside the interval): the
    # small validation share cannot vouch for it, uniform is handed out
    rng = np.random.default_rng(2)
    base = list(1.0 + 0.5 * rng.random(8))
    low = _candidate("refined", [x * 0.9 for x in base], base)
    noisy = [x * (1.02 + 0.3 * (i % 2 - 0.5)) for i, x in enumerate(base)]
    behind = paired_comparison(_stats(noisy), _stats(base), resamples(8))["kl"]
    assert behind.point_worse and not behind.worse
    low = AppliedCandidate(label=low.label, error=low.error, metrics=low.metrics,
                           vs_uniform={**low.vs_uniform, "perplexity": behind})
    assert low.behind_on == ["perplexity"] and not low.worse_on
    assert choose([low, _candidate("uniform ≤", base, None)]) == "uniform ≤"
    assert low.to_dict()["behind_on"] == ["perplexity"]


def test_ties_keep_the_first_candidate_and_no_candidate_is_an_error() -> None:
    a = _candidate("refined", [1.0, 1.0], None)
    b = _candidate("uniform ≤", [1.0, 1.0], None)
    assert choose([a, b]) == "refined"
    with pytest.raises(InvalidParameterError, match="no candidate"):
        choose([])


def test_applied_choice_applies_each_distinct_plan_and_restores_the_weights(tiny, tiny_calib) -> None:
    import torch

    from allocator.backend import apply_plan, evaluate, reference_outputs
    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable
    from allocator.core.units import discover_units
    from allocator.jobs.applied import applied_choice

    model = tiny.model
    units = [u for u in discover_units(model) if u.name.startswith("model.layers.")]
    opts = ("int2-g32-asym", "int4-g32-asym")
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=opts, cost=[[2.0, 1.0]] * len(units),
                                      in_features=[u.in_features for u in units])
    low = BitPlan.from_choice(table, dict.fromkeys(table.units, opts[0]))
    mixed = BitPlan.from_choice(table, {u: opts[i % 2] for i, u in enumerate(table.units)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit, val = tiny_calib[:1], tiny_calib[1:]
    restored: list[int] = []

    def restore() -> None:
        restored.append(1)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(before[k])

    got = applied_choice(model, {"refined": mixed, "table optimum": mixed, "uniform ≤": low},
                         kind="causal_lm", method="gptq", fit=fit, validation=val, units=units,
                         restore=restore, uniform="uniform ≤")
    assert [c.label for c in got.candidates] == ["refined", "uniform ≤"]
    assert got.candidate("table optimum").same_as == ("table optimum",)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # each error is what the backend's GPTQ (fitted on the fit share) measures on validation
    ref = reference_outputs(model, val, kind="causal_lm")
    apply_plan(model, mixed, method="gptq", calibration=fit, units=units)
    want = evaluate(model, val, ref).error
    restore()
    assert got.candidate("refined").error == pytest.approx(want, rel=1e-6)
    assert "kl" in got.candidate("refined").vs_uniform and not got.candidate("uniform ≤").vs_uniform
    assert got.chosen == choose(got.candidates)
