"""allocator.service.client.Client end to end (through the TestClient transport)."""

from __future__ import annotations

import pytest

from allocator.service.client import Client, ServiceClientError
from tests.service.conftest import TOKEN


@pytest.fixture
def api(anon) -> Client:  # type: ignore[no-untyped-def]
    return Client(token=TOKEN, http=anon)


def test_round_trip(api, table, tmp_path):  # type: ignore[no-untyped-def]
    assert api.health()["status"] == "ok"
    t = api.upload_table(table, name="synth", metadata={"note": "x"})
    assert t["fingerprint"] == table.fingerprint and t["metadata"]["note"] == "x"
    path = table.save(tmp_path / "t.csv")
    assert api.upload_table(path)["deduplicated"] is True
    assert api.download_table(t["id"]).fingerprint == table.fingerprint
    p = api.plan(t["id"], bpw=3.5)
    plan = Client.bitplan(p)
    assert plan.summary.bpw <= 3.5 and api.get_plan(p["id"])["id"] == p["id"]
    assert api.plans(table_id=t["id"])["count"] == 1
    assert api.export(p["id"], "llamacpp", lossy=True)["target"] == "llamacpp"
    assert len(api.frontier(t["id"], bpw=[3.0])["points"]) > 2
    api.delete_plan(p["id"])
    api.delete_table(t["id"])
    assert api.tables()["count"] == 0


def test_jobs_and_wait(api, worker):  # type: ignore[no-untyped-def]
    job = api.submit("sleep", {"seconds": 0.1})
    done = api.wait(job["id"], timeout=20, poll=0.02)
    assert done["status"] == "succeeded" and api.result(job["id"])["slept"] == 0.1
    assert api.jobs(status="succeeded")["count"] == 1
    q = api.submit("sleep", {"seconds": 30, "steps": 300})
    api.cancel(q["id"])
    assert api.wait(q["id"], timeout=20, poll=0.02)["status"] == "cancelled"


def test_errors_carry_the_stable_code(api, anon):  # type: ignore[no-untyped-def]
    with pytest.raises(ServiceClientError) as info:
        api.plan("missing", bpw=3.0)
    assert info.value.status == 404 and info.value.code == "table_not_found"
    with pytest.raises(ServiceClientError) as info:
        api.submit("estimate", {"model": "../x"})
    assert info.value.code == "path_not_allowed"
    with pytest.raises(ServiceClientError) as info:
        Client(token="wrong-token-wrong-token", http=anon).submit("sleep", {})
    assert info.value.code == "unauthorized"
