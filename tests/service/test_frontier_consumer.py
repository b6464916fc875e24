"""``GET /v1/tables/{id}/frontier?consumer=NAME``: the frontier as an export target stores the
table (the service side of ``bitalloc frontier --for NAME``), through HTTP and the client."""

from __future__ import annotations

import numpy as np
import pytest

import solvers
from allocator.core.budget import Budget
from allocator.export.palettes import table_for
from allocator.service.client import Client, ServiceClientError
from tests.service.conftest import TOKEN, upload


def test_frontier_for_a_consumer_matches_the_cli_path(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.get(f"/v1/tables/{tid}/frontier", params={"bpw": [3.0], "consumer": "hqq"})
    assert r.status_code == 200, r.text
    doc = r.json()
    hqq = table_for(table, "hqq")  # what `bitalloc frontier --for hqq` sweeps
    ref = solvers.frontier(hqq, budgets=[Budget(bpw=3.0)])
    assert doc["consumer"] == "hqq" and len(doc["points"]) == len(ref)
    np.testing.assert_allclose([p["cost"] for p in doc["points"]], ref.cost)
    np.testing.assert_allclose([p["size_bits"] for p in doc["points"]], ref.size_bits)
    plain = client.get(f"/v1/tables/{tid}/frontier", params={"bpw": [3.0]}).json()
    assert plain["consumer"] is None and len(plain["points"]) != len(doc["points"])
    # a point's plan only uses HQQ's options and gives every tie group one setting
    last = client.get(f"/v1/tables/{tid}/frontier/-1", params={"bpw": [3.0], "consumer": "hqq"})
    assert last.status_code == 200, last.text
    plan = Client.bitplan(last.json())
    assert set(plan.choice.values()) <= set(hqq.options)
    ties = hqq.df.drop_duplicates("unit").set_index("unit")["tie"]
    for tie in set(ties) - {""}:
        assert len({plan.choice[u] for u in ties.index[ties == tie]}) == 1, tie


def test_frontier_consumer_errors_are_422(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.get(f"/v1/tables/{tid}/frontier", params={"consumer": "vllm"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_name"
    assert "unknown consumer 'vllm'" in r.json()["error"]["message"]
    # int2..5-g128-asym: no ggml type among them; the message says how to get a table that has
    r = client.get(f"/v1/tables/{tid}/frontier", params={"consumer": "llamacpp"})
    assert r.status_code == 422 and "estimate it --for llamacpp" in r.json()["error"]["message"]
    made_for = upload(client, table_for(table, "hqq"), name="hqq.parquet")["id"]
    r = client.get(f"/v1/tables/{made_for}/frontier/0", params={"consumer": "torchao"})
    assert r.status_code == 422 and "built --for hqq" in r.json()["error"]["message"]
    ok = client.get(f"/v1/tables/{made_for}/frontier", params={"consumer": "hqq"})
    assert ok.status_code == 200 and ok.json()["consumer"] == "hqq"


def test_client_frontier_for_a_consumer(anon, table):  # type: ignore[no-untyped-def]
    api = Client(token=TOKEN, http=anon)
    tid = api.upload_table(table)["id"]
    doc = api.frontier(tid, bpw=[3.0], consumer="hqq")
    assert doc["consumer"] == "hqq"
    plan = api.frontier_plan(tid, 0, bpw=[3.0], consumer="hqq")
    assert set(plan.choice.values()) <= {"int2-g128-asym", "int4-g128-asym", "fp16"}
    with pytest.raises(ServiceClientError) as info:
        api.frontier(tid, consumer="nope")
    assert info.value.code == "unknown_name"
