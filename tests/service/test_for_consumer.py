"""The service's ``consumer`` (issue 12, ``--for``): estimate jobs build the consumer's table, plans
on it export without --lossy, and plans for another consumer are refused."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.service.conftest import upload, wait_job

TINY_LLAMA = Path(__file__).resolve().parents[2] / "allocator" / "assets" / "tiny-llama"


def _submit(client, params):  # type: ignore[no-untyped-def]
    return client.post("/v1/jobs", json={"kind": "estimate", "params": params})


def test_estimate_job_for_hqq_then_plan_and_export(client, worker, model_root):  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("torch") is None or not (TINY_LLAMA / "config.json").is_file():
        pytest.skip("needs torch and the bundled tiny-llama")
    shutil.copytree(TINY_LLAMA, model_root / "tl")
    r = _submit(client, {"model": "models/tl", "method": "datafree", "consumer": "hqq"})
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"], timeout=180)
    assert done["status"] == "succeeded", done
    tid = client.get(f"/v1/jobs/{done['id']}/result").json()["result"]["table_id"]
    assert all(o.endswith("-asym") or o == "fp16" for o in client.get(f"/v1/tables/{tid}").json()["options"])
    plan = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.5}, "consumer": "hqq"})
    assert plan.status_code == 201, plan.text
    assert plan.json()["plan"]["summary"]["bpw"] <= 3.5 + 1e-9
    out = client.get(f"/v1/plans/{plan.json()['id']}/export", params={"target": "hqq"})
    assert out.status_code == 200, out.text
    assert out.json()["changed"] == {}
    other = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.5},
                                           "consumer": "llamacpp"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "table_not_for_consumer"
    assert "estimated for hqq" in other.json()["error"]["message"]


def test_consumer_parameters_are_checked(client, table):  # type: ignore[no-untyped-def]
    r = _submit(client, {"model": "models/tiny", "consumer": "hqq", "options": "int4-g128-asym"})
    assert r.status_code == 422 and "drop --options" in r.text
    r = _submit(client, {"model": "models/tiny", "consumer": "vllm"})
    assert r.status_code == 422 and "unknown consumer 'vllm'" in r.text
    tid = upload(client, table)["id"]
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.0}, "consumer": "hqq"})
    assert r.status_code == 422 and "without a consumer" in r.json()["error"]["message"]
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.0}, "consumer": "nope"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_name"
