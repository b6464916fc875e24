"""/v1/plans and the frontier: synchronous solves, statuses, errors, export."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import solvers
from allocator.core.budget import Budget
from allocator.core.plan import BitPlan, check_plan
from tests.service.conftest import upload


def test_plan_matches_the_library_and_passes_the_check(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.5}})
    assert r.status_code == 201, r.text
    doc = r.json()
    ref = solvers.solve(table, Budget(bpw=3.5))
    assert doc["status"] == "optimal" and doc["solver"] == "mckp"
    assert doc["objective"] == pytest.approx(ref.objective)
    plan = BitPlan.from_dict(doc["plan"])
    assert plan.choice == ref.plan.choice
    assert check_plan(plan, table, Budget(bpw=3.5)) == []
    assert client.get(f"/v1/plans/{doc['id']}").json()["plan"] == doc["plan"]


def test_infeasible_is_a_status_with_the_smallest_feasible_budget(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    doc = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 0.5}}).json()
    assert doc["status"] == "infeasible" and doc["plan"] is None
    assert doc["min_feasible"] == pytest.approx(solvers.solve(table, Budget(bpw=0.5)).min_feasible)


def test_resource_caps_and_unit_restrictions(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    unit = table.units[0]
    budget = {"bpw": 4.0, "unit_max_bits": {unit: 3}, "min_bits": 2}
    doc = client.post("/v1/plans", json={"table_id": tid, "budget": budget}).json()
    assert doc["status"] == "optimal"
    assert doc["plan"]["assignments"][unit]["bits"] <= 3


def test_store_false_solves_without_keeping(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.0}, "store": False})
    assert r.status_code == 200 and r.json()["id"] is None and r.json()["plan"] is not None
    assert client.get("/v1/plans").json()["count"] == 0


@pytest.mark.parametrize("budget, code", [
    ({"bpw": 3, "size_bytes": 100}, "invalid_budget"),
    ({}, "invalid_budget"),
    ({"bpw": -1}, "validation_error"),
    ({"bpw": 3, "nonsense": 1}, "validation_error"),
    ({"bpw": 3, "max": {"cost": 1}}, "invalid_budget"),
    ({"bpw": 3, "min_bits": 8, "max_bits": 2}, "invalid_budget"),
])
def test_bad_budgets_are_422(client, table, budget, code):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.post("/v1/plans", json={"table_id": tid, "budget": budget})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


def test_solver_errors(client, table, monkeypatch):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3}, "solver": "nope"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_name"
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3}, "solver": "bayesian"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "use_search_job"
    monkeypatch.setitem(solvers.SOLVERS, "ghost", "solvers._not_built_yet:Ghost")
    r = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3}, "solver": "ghost"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "solver_unavailable"
    r = client.post("/v1/plans", json={"table_id": "missing", "budget": {"bpw": 3}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "table_not_found"


def test_list_filter_and_delete(client, table):  # type: ignore[no-untyped-def]
    from allocator.core.synth import synth_table

    t1 = upload(client, table)["id"]
    t2 = upload(client, synth_table(n_units=4, n_options=3, seed=9))["id"]
    ids = [client.post("/v1/plans", json={"table_id": t, "budget": {"bpw": b}}).json()["id"]
           for t, b in ((t1, 3.0), (t1, 4.0), (t2, 4.0))]
    assert client.get("/v1/plans").json()["count"] == 3
    assert {p["id"] for p in client.get("/v1/plans", params={"table_id": t1}).json()["data"]} == set(ids[:2])
    assert client.delete(f"/v1/plans/{ids[0]}").status_code == 204
    assert client.get(f"/v1/plans/{ids[0]}").status_code == 404
    assert client.delete(f"/v1/plans/{ids[0]}").json()["error"]["code"] == "plan_not_found"


def test_frontier_matches_the_library(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    doc = client.get(f"/v1/tables/{tid}/frontier", params={"bpw": [3.3]}).json()
    ref = solvers.frontier(table, budgets=[Budget(bpw=3.3)])
    assert len(doc["points"]) == len(ref)
    np.testing.assert_allclose([p["cost"] for p in doc["points"]], ref.cost)
    assert any(p["kind"] == "exact" for p in doc["points"])
    sizes = [p["size_bits"] for p in doc["points"]]
    assert sizes == sorted(sizes)
    last = client.get(f"/v1/tables/{tid}/frontier/-1").json()
    assert last["plan"]["summary"]["size_bits"] == pytest.approx(sizes[-1])
    r = client.get(f"/v1/tables/{tid}/frontier/{len(sizes) + 5}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "frontier_point_not_found"
    r = client.get(f"/v1/tables/{tid}/frontier", params={"bpw": [-2]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_budget"
    assert client.get("/v1/tables/nope/frontier").status_code == 404
    assert all(p["cost_std"] is None for p in doc["points"])  # this table has no cost_std


def test_frontier_carries_the_cost_std_band(client, table):  # type: ignore[no-untyped-def]
    from allocator import CostTable

    df = table.df.copy()
    df["cost_std"] = 0.1 * df["cost"]
    with_std = CostTable(df)
    tid = upload(client, with_std)["id"]
    doc = client.get(f"/v1/tables/{tid}/frontier").json()
    ref = solvers.frontier(with_std)
    assert ref.cost_std is not None
    np.testing.assert_allclose([p["cost_std"] for p in doc["points"]], ref.cost_std, rtol=1e-12)


def test_export_targets_and_errors(client, table, monkeypatch):  # type: ignore[no-untyped-def]
    from allocator.export import export_plan

    tid = upload(client, table)["id"]
    doc = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 3.5}}).json()
    r = client.get(f"/v1/plans/{doc['id']}/export", params={"target": "llamacpp", "lossy": True})
    assert r.status_code == 200, r.text
    ref = export_plan(BitPlan.from_dict(doc["plan"]), "llamacpp", lossy=True)
    assert r.json()["text"] == ref.text and r.json()["suffix"] == ref.suffix
    r = client.get(f"/v1/plans/{doc['id']}/export", params={"target": "nope"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_name"
    r = client.get(f"/v1/plans/{doc['id']}/export", params={"target": "gptqmodel"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "export_failed"  # fused q/k/v differ
    infeasible = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 0.5}}).json()
    r = client.get(f"/v1/plans/{infeasible['id']}/export", params={"target": "llamacpp"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "plan_has_no_assignments"
    monkeypatch.setitem(sys.modules, "allocator.export", None)  # an install without exporters
    r = client.get(f"/v1/plans/{doc['id']}/export", params={"target": "llamacpp"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "export_unavailable"
