"""benchmarks/llm_quality.py: its bootstrap pieces, and one tiny end-to-end run on tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.bench_loader import load_benchmark


def _bench() -> ModuleType:
    return load_benchmark("llm_quality")


def _texts(kl: list[float], nll: list[float]) -> Any:
    """Per-text sums of two texts, as allocator.backend.evaluate keeps them for a causal LM."""
    from allocator.backend import RatioMetric, SampleStats, Transform

    return SampleStats(columns={"kl": np.array(kl), "tokens": np.array([2.0, 2.0]),
                                "nll": np.array(nll), "targets": np.array([1.0, 3.0])},
                       metrics={"kl": RatioMetric(numerator="kl", denominator="tokens"),
                                "perplexity": RatioMetric(numerator="nll", denominator="targets",
                                                          transform=Transform.EXP)})


def test_corpus_values_are_ratios_of_sums_and_pairs_share_resamples() -> None:
    b = _bench()
    a, c = _texts([1.0, 3.0], [2.0, 6.0]), _texts([2.0, 6.0], [2.0, 6.0])
    assert a.value("kl") == pytest.approx(1.0)                # (1 + 3) / (2 + 2)
    assert a.value("perplexity") == pytest.approx(np.exp(2.0))  # exp((2 + 6) / (1 + 3))
    idx = b.resamples(2, 50, seed=0)
    r = b.compare(a, c, idx)
    # c's KL is exactly 2× a's on every text: every paired resample gives 0.5
    assert r["kl_ratio"] == {"value": pytest.approx(0.5), "lo": pytest.approx(0.5), "hi": pytest.approx(0.5)}
    assert r["ppl_ratio"]["value"] == pytest.approx(1.0)
    # unpaired, the same texts' KL varies between resamples
    s = b.summarize(a, idx)["kl"]
    assert s["lo"] < s["value"] < s["hi"]


@pytest.mark.filterwarnings("ignore")
def test_tiny_llama_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "q.json"
    res = _bench().main(["--model", "tiny-llama", "--calib", "4", "--evals", "8", "--seq-len", "32",
                         "--budgets", "3.25", "--no-rtn-chosen", "--presets", "Q2_K", "Q3_K_S",
                         "--rounds", "0", "--bootstrap", "200", "--json", str(out),
                         "--options", "int2-g128-asym,int3-g128-asym,int4-g128-asym"])
    assert json.loads(out.read_text())["model"] == "tiny-llama"
    (g,), (p, same) = res["gptq"], res["llamacpp"]
    # tiny-llama's 128-wide rows send both presets to the same fallbacks: measured once
    assert same["same_as"] == "Q2_K" and same["preset_name"] == "Q3_K_S" and "same_as" not in p
    assert same["preset"] == p["preset"] and same["plan"] == p["plan"]
    assert g["uniform_label"] == "int3-g128-asym" and g["uniform"]["bpw"] == 3.25
    assert g["gptq-chosen"]["bpw"] <= 3.25 + 1e-9
    assert p["plan"]["bpw"] <= p["preset"]["bpw"] + 1e-9
    spread = [g[k][m] for k in ("uniform", "gptq-chosen") for m in ("kl", "perplexity")]
    spread += [p[k][m] for k in ("preset", "plan") for m in ("kl", "perplexity")] + [res["fp"]["perplexity"]]
    ratios = [g["gptq-chosen"]["kl_ratio"], g["gptq-chosen"]["ppl_ratio"], p["plan"]["kl_ratio"],
              p["plan"]["ppl_ratio"]]
    for ci in spread + ratios:
        assert ci["lo"] <= ci["value"] <= ci["hi"], ci
    for ci in spread:  # texts differ: resampling them moves the corpus values
        assert ci["lo"] < ci["hi"], ci
    assert isinstance(g["target_met"], bool) and isinstance(p["target_met"], bool)


def test_without_types_drops_only_those_options_and_names_an_unknown_one() -> None:
    from allocator.core.errors import InvalidParameterError
    from allocator.core.table import CostTable

    opts = ["q4_0", "q4_1", "q5_1"]
    table = CostTable.from_unit_costs(units=["a", "b"], params=[64, 64], options=opts,
                                      cost=np.array([[3.0, 1.0, 0.5], [2.0, 0.0, 0.1]]),
                                      in_features=[32, 32])
    b = _bench()
    kept = b.without_types(table, ["q4_1"])
    assert kept.options == ["q4_0", "q5_1"] and kept.units == table.units
    assert kept.df.set_index(["unit", "option"])["cost"].to_dict() == {
        ("a", "q4_0"): 3.0, ("a", "q5_1"): 0.5, ("b", "q4_0"): 2.0, ("b", "q5_1"): 0.1}
    assert b.without_types(table, []) is table
    with pytest.raises(InvalidParameterError, match="q8_0"):
        b.without_types(table, ["q8_0"])
