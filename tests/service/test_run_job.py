"""The service's ``run`` job (issue 9): ``bitalloc run`` on a model under a root stores the table
and the plan chosen among measured candidates, reports every candidate's calibration error, and
never hands out a plan that measured worse than uniform without a warning."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from allocator.service.infra.errors import ServiceError
from allocator.service.job_kinds import JOB_KINDS, JobCancelled
from tests.service.conftest import wait_job

TINY_LLAMA = Path(__file__).resolve().parents[2] / "allocator" / "assets" / "tiny-llama"
#: a tiny, quick run: the data-free estimator, three options, few short samples, one round
FAST = {"estimator": "datafree", "options": "int2-g64-asym,int4-g64-asym,int8-ch-sym",
        "calib_samples": 4, "eval_samples": 4, "seq_len": 32, "refine_rounds": 1}
#: inline calibration texts (a quarter of them, chosen by hash, are held out for evaluation)
TEXTS = [f"text number {i}: the quick brown fox jumps over the lazy dog near the river bank"
         for i in range(120)]


def _needs_tiny_llama() -> None:
    if importlib.util.find_spec("torch") is None or not (TINY_LLAMA / "config.json").is_file():
        pytest.skip("needs torch and the bundled tiny-llama")


def _submit(client, params):  # type: ignore[no-untyped-def]
    return client.post("/v1/jobs", json={"kind": "run", "params": params})


def test_run_job_stores_the_table_and_the_chosen_plan(client, worker, model_root) -> None:  # type: ignore[no-untyped-def]
    _needs_tiny_llama()
    shutil.copytree(TINY_LLAMA, model_root / "tl")
    r = _submit(client, {"model": "models/tl", "bpw": 4.5, **FAST})
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"], timeout=240)
    assert done["status"] == "succeeded", done
    res = client.get(f"/v1/jobs/{done['id']}/result").json()["result"]
    table = client.get(f"/v1/tables/{res['table_id']}")
    assert table.status_code == 200, table.text
    plan = client.get(f"/v1/plans/{res['plan_id']}").json()
    assert plan["table_id"] == res["table_id"] and plan["job_id"] == done["id"]
    assert plan["status"] == "feasible" and plan["budget"]["bpw"] == 4.5
    assert plan["plan"]["summary"]["bpw"] <= 4.5 + 1e-9
    assert plan["objective"] == pytest.approx(plan["plan"]["summary"]["predicted_cost"])
    # every candidate was measured on calibration data; the plan handed out is the best of them,
    # refined from it (never worse than where it started)
    sel = res["selection"]
    cands = sel["candidates"]
    assert set(cands) == {"table optimum", "uniform ≤"}, sel
    assert sel["start"] == min(cands, key=cands.get)
    assert sel["error"] <= min(cands.values()) + 1e-12
    assert res["chosen"].startswith("chosen"), res["chosen"]
    labels = [row["label"] for row in res["rows"]]
    assert res["chosen"] in labels and "mixed" in labels and "uniform ≤" in labels
    assert all(row["bpw"] > 0 and row["error"] >= 0 for row in res["rows"])
    assert isinstance(res["worse_than_uniform"], bool)
    # a warning when the point estimate is worse, or any metric beyond its interval
    assert ("warning" in res) == (res["worse_than_uniform"] or bool(res["worse_than_uniform_on"]))
    assert res["error_ratio"] is None or res["error_ratio"] > 0


@pytest.mark.parametrize(("params", "needle"), [
    ({"bpw": 0}, "params.bpw must be a number > 0"),
    ({"bpw": "4"}, "params.bpw must be a number > 0"),
    ({}, "params.bpw must be a number > 0"),
    ({"bpw": 4, "calib_samples": 0}, "params.calib_samples must be an int ≥ 1"),
    ({"bpw": 4, "eval_samples": 1}, "params.eval_samples must be an int ≥ 2"),
    ({"bpw": 4, "refine_rounds": -1}, "params.refine_rounds must be an int ≥ 0"),
    ({"bpw": 4, "refine_time_limit": 0}, "params.refine_time_limit must be seconds > 0"),
    ({"bpw": 4, "validation_share": "a quarter"}, "params.validation_share must be a number"),
    ({"bpw": 4, "validation_share": 0.9}, "validation"),
    ({"bpw": 4, "budget": {"bpw": 3}}, "unknown run parameter(s) ['budget']"),
    ({"bpw": 4, "n_trials": 3}, "unknown run parameter(s) ['n_trials']"),
    ({"bpw": 4, "include": "layer("}, "neither a glob nor a valid regex"),
    ({"bpw": 4, "estimator": "nope"}, "unknown estimator 'nope'"),
    ({"bpw": 4, "estimator": "datafree", "estimator_params": {"zzz": 1}}, "no parameter 'zzz'"),
    ({"bpw": 4, "options": "int9"}, "unknown option label 'int9'"),
    ({"bpw": 4, "consumer": "hqq", "options": "int4-g128-asym"}, "drop --options"),
    ({"bpw": 4, "data": [1, 2]}, "params.data must be a non-empty list of texts"),
])
def test_bad_parameters_are_refused_at_submission(client, params, needle) -> None:  # type: ignore[no-untyped-def]
    r = _submit(client, {"model": "models/tiny", **params})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_parameter" and needle in err["message"], err


def test_a_model_outside_the_roots_is_refused(client) -> None:  # type: ignore[no-untyped-def]
    r = _submit(client, {"model": "/etc", "bpw": 4})
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"


def test_validation_normalises_what_the_worker_runs(model_root: Path) -> None:
    out = JOB_KINDS["run"].validate({"model": "models/tiny", "bpw": 4, "include": "model.layers.0",  # type: ignore[misc]
                                     "options": ["int4-g64-asym", "int8-ch-sym"],
                                     "data": ["one text", "another"]}, [model_root])
    assert out["model"] == str((model_root / "tiny").resolve())
    assert out["include"] == ["model.layers.0"] and out["options"] == "int4-g64-asym,int8-ch-sym"
    assert out["budget"] == {"bpw": 4.0} and out["data"] == ["one text", "another"]
    with pytest.raises(ServiceError, match="unknown run parameter"):
        JOB_KINDS["run"].validate({"model": "models/tiny", "bpw": 4, "method": "x"}, [model_root])  # type: ignore[misc]


def test_cancel_is_honoured_before_the_first_stage(model_root: Path) -> None:
    params = JOB_KINDS["run"].validate({"model": "models/tiny", "bpw": 4, **FAST}, [model_root])  # type: ignore[misc]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelled):  # before the model is even loaded
        JOB_KINDS["run"].run(params, lambda f, m: None, cancel)


def test_a_plan_worse_than_uniform_carries_a_warning(model_root: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _needs_tiny_llama()
    from allocator.core.result import SolveResult
    from allocator.core.table import CostTable
    from allocator.jobs import pipeline

    real = pipeline.run_pipeline

    def uniform_looks_better(cfg: Any, **kw: Any) -> Any:
        # the same run, with the uniform plan's held-out error cut below the chosen plan's
        run = real(cfg, **kw)
        below = run.uniform_below
        assert below is not None
        rep = below.report
        better = dataclasses.replace(rep, metrics={**rep.metrics,
                                                   rep.error_metric: run.result.report.error / 2})
        return dataclasses.replace(run, uniform_below=dataclasses.replace(below, report=better))

    monkeypatch.setattr(pipeline, "run_pipeline", uniform_looks_better)
    shutil.copytree(TINY_LLAMA, model_root / "tl")
    params = JOB_KINDS["run"].validate({"model": "models/tl", "bpw": 4.5, **FAST,  # type: ignore[misc]
                                        "refine_rounds": 0, "data": TEXTS}, [model_root])
    stages: list[tuple[float, str]] = []
    out = JOB_KINDS["run"].run(params, lambda f, m: stages.append((f, m)), threading.Event())
    assert out["worse_than_uniform"] is True and out["error_ratio"] == pytest.approx(2.0)
    assert "measured worse than the uniform plan" in out["warning"]
    assert isinstance(out["table"], CostTable) and isinstance(out["plan"], SolveResult)
    assert out["config"]["data"] == "120 inline texts"
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(stages) >= 5


def test_the_client_submits_a_run_job(anon) -> None:  # type: ignore[no-untyped-def]
    from allocator.service.client import Client, ServiceClientError
    from tests.service.conftest import TOKEN

    api = Client(token=TOKEN, http=anon)
    job = api.run("models/tiny", bpw=4.0, estimator="datafree", refine_rounds=0)
    assert job["kind"] == "run" and job["status"] == "queued"
    with pytest.raises(ServiceClientError, match="params.bpw"):
        api.run("models/tiny", bpw=-1.0)
