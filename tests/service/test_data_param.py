"""The service's estimate job takes the user's calibration text (``params.data``): inline texts
or a file under a model root, confined like model paths."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.service.conftest import wait_job

TINY_LLAMA = Path(__file__).resolve().parents[2] / "allocator" / "assets" / "tiny-llama"


def _submit(client, params):  # type: ignore[no-untyped-def]
    return client.post("/v1/jobs", json={"kind": "estimate", "params": params})


def test_data_values_are_checked_and_confined(client, model_root, tmp_path):  # type: ignore[no-untyped-def]
    (model_root / "mine.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the service")
    ok = [["one text", "another"], "models/mine.jsonl", str(model_root / "mine.jsonl")]
    for data in ok:
        r = _submit(client, {"model": "models/tiny", "data": data})
        assert r.status_code == 202, r.text
    bad = [
        (str(outside), 403, "path_not_allowed"),
        ("models/../secret.txt", 403, "path_not_allowed"),
        ("models/none.txt", 404, "data_not_found"),
        ("models/tiny", 422, "invalid_parameter"),  # a folder, not a text file
        ([], 422, "invalid_parameter"),
        ([1, 2], 422, "invalid_parameter"),
        ({"text": "x"}, 422, "invalid_parameter"),
    ]
    for data, status, code in bad:
        r = _submit(client, {"model": "models/tiny", "data": data})
        assert r.status_code == status and r.json()["error"]["code"] == code, (data, r.text)
    r = _submit(client, {"model": "models/tiny", "params": {"data": str(outside)}})
    assert r.status_code == 422 and "params.data" in r.json()["error"]["message"]


def test_estimate_job_calibrates_on_inline_texts(client, worker, model_root):  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("torch") is None or not (TINY_LLAMA / "config.json").is_file():
        pytest.skip("needs torch and the bundled tiny-llama")
    from allocator.model.data import corpus_texts

    shutil.copytree(TINY_LLAMA, model_root / "tl")
    texts = corpus_texts("train")[:40]
    r = _submit(client, {"model": "models/tl", "method": "hessian-proxy", "samples": 4,
                         "seq_len": 32, "data": texts})
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"], timeout=180)
    assert done["status"] == "succeeded", done
    tid = client.get(f"/v1/jobs/{done['id']}/result").json()["result"]["table_id"]
    meta = client.get(f"/v1/tables/{tid}").json()["metadata"]
    builtin = _submit(client, {"model": "models/tl", "method": "hessian-proxy", "samples": 4,
                               "seq_len": 32})
    done2 = wait_job(client, builtin.json()["id"], timeout=180)
    tid2 = client.get(f"/v1/jobs/{done2['id']}/result").json()["result"]["table_id"]
    meta2 = client.get(f"/v1/tables/{tid2}").json()["metadata"]
    # the user's texts, not the built-in corpus
    assert meta["data"]["source"] == "texts" and meta2["data"]["source"].startswith("builtin:")
