"""The estimate job's ``include`` / ``exclude`` (the globs of ``bitalloc run``) and ``device``:
checked at submission, and the device again on the worker that runs the model."""

from __future__ import annotations

import pytest

from allocator.service.job_kinds import estimate_spec_of
from tests.service.conftest import wait_job


def test_include_exclude_are_globs_of_the_spec() -> None:
    spec = estimate_spec_of({"model": "m", "method": "datafree", "include": "model.layers.0",
                             "exclude": ["*.o_proj", "lm_head"]})
    assert spec.include == ("model.layers.0",) and spec.exclude == ("*.o_proj", "lm_head")


def test_a_bad_pattern_is_refused_at_submission(client) -> None:  # type: ignore[no-untyped-def]
    for bad, needle in (("layer(", "neither a glob nor a valid regex"), ([""], "non-empty glob")):
        r = client.post("/v1/jobs", json={"kind": "estimate",
                                          "params": {"model": "models/tiny", "include": bad}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_parameter" and needle in r.text


def test_the_device_name_is_checked_at_submission(client) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/v1/jobs", json={"kind": "estimate",
                                      "params": {"model": "models/tiny", "device": "gpu0"}})
    assert r.status_code == 422 and "params.device 'gpu0' is not a device name" in r.text


def test_a_device_the_worker_lacks_fails_the_job_clearly(client, worker) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a worker without CUDA")
    r = client.post("/v1/jobs", json={"kind": "estimate", "params": {
        "model": "models/tiny", "method": "datafree", "device": "cuda"}})
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"], timeout=60)
    assert done["status"] == "failed", done
    assert "params.device cuda: CUDA is not available here" in str(done["error"]), done
