"""benchmarks/plan_quality.py --cross-domain: the run's split on every calibration set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench_loader import load_benchmark


@pytest.mark.filterwarnings("ignore")
def test_cross_domain_fits_on_the_fit_share_and_rates_every_domain(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "cross.json"
    rc = load_benchmark("plan_quality").main([
        "--cross-domain", "--models", "tiny-llama", "--calib-sets", "mix", "--budgets", "3.25",
        "--calib", "8", "--evals", "2", "--rounds", "0", "--estimators", "hessian-proxy",
        "--options", "int2-g128-asym,int3-g128-asym,int4-g128-asym", "--json", str(out)])
    assert rc == 0
    (res,) = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["calibration"] == "mix" and row["domains"] == res["domains"]
    # the table saw only the fit share; the validation share judged the candidates
    assert row["validation_samples"] >= 1 and row["fit_samples"] >= 1
    assert row["refine_rounds"] == 0 and row["uniform_bpw"] == pytest.approx(3.25)
    for d in res["domains"]:
        assert row["ratio"][d] == pytest.approx(row["default"][d] / row["uniform"][d])
