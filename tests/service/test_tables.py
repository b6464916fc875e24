"""/v1/tables: upload in three formats, validation, dedup, list/get/download/delete, auth, limits."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from allocator.core.table import CostTable
from allocator.service.parquet import table_from_parquet, table_to_parquet
from tests.service.conftest import AUTH, upload


def _csv(table: CostTable) -> bytes:
    return table.df.to_csv(index=False).encode()


def _json(table: CostTable) -> bytes:
    return json.dumps({"format": "bitalloc.cost_table", "version": 1, "metadata": table.metadata,
                       "rows": table.df.to_dict(orient="records")}, default=str).encode()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_upload_each_format_same_fingerprint(client, table, fmt):  # type: ignore[no-untyped-def]
    body = {"parquet": table_to_parquet, "csv": _csv, "json": _json}[fmt](table)
    r = client.post("/v1/tables", files={"file": (f"costs.{fmt}", body)})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["fingerprint"] == table.fingerprint
    got = (doc["n_units"], doc["n_rows"], doc["total_params"])
    assert got == (table.n_units, len(table), table.total_params)
    assert doc["options"] == table.options and doc["deduplicated"] is False


def test_upload_sniffs_format_without_suffix(client, table):  # type: ignore[no-untyped-def]
    r = client.post("/v1/tables", files={"file": ("blob", table_to_parquet(table))})
    assert r.status_code == 201 and r.json()["fingerprint"] == table.fingerprint
    r = client.post("/v1/tables", files={"file": ("blob", _json(table))})
    assert r.status_code == 200 and r.json()["deduplicated"] is True


def test_dedup_returns_the_stored_table(client, table):  # type: ignore[no-untyped-def]
    first = upload(client, table)
    r = client.post("/v1/tables", files={"file": ("again.csv", _csv(table))})
    assert r.status_code == 200
    assert r.json()["id"] == first["id"] and r.json()["deduplicated"] is True
    assert client.get("/v1/tables").json()["count"] == 1


def test_metadata_and_name_form_fields(client, table):  # type: ignore[no-untyped-def]
    r = client.post("/v1/tables", files={"file": ("c.csv", _csv(table))},
                    data={"name": "llama costs", "metadata": json.dumps({"estimator": "fisher", "seed": 3})})
    doc = r.json()
    assert r.status_code == 201 and doc["name"] == "llama costs"
    assert doc["metadata"]["estimator"] == "fisher" and doc["metadata"]["seed"] == 3
    r = client.post("/v1/tables", files={"file": ("c.csv", _csv(table))}, data={"metadata": "[1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize("breakage, needle", [
    (lambda df: df.drop(columns=["cost"]), "missing column"),
    (lambda df: df.assign(cost=df["cost"].where(df.index != 3, float("nan"))), "cost"),
    (lambda df: df.assign(cost=df["cost"].where(df.index != 1, -1.0)), "cost"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "duplicate"),
    (lambda df: df.assign(params=df["params"].where(df.index != 0, 7)), "inconsistent"),
])
def test_invalid_tables_are_422_with_the_library_message(client, table, breakage, needle):  # type: ignore[no-untyped-def]
    bad = breakage(table.df.copy())
    r = client.post("/v1/tables", files={"file": ("bad.csv", bad.to_csv(index=False).encode())})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_cost_table" and needle in err["message"]
    assert "Traceback" not in r.text


@pytest.mark.parametrize("name, body", [
    ("x.parquet", b"PAR1 not really parquet"), ("x.json", b"{not json"), ("x.json", b'{"rows": 5}'),
    ("x.json", b"[1, 2]"), ("x.csv", b"\xff\xfe\x00garbage"), ("x.csv", b"a,b\n1,2\n"),
])
def test_garbage_uploads_are_422(client, name, body):  # type: ignore[no-untyped-def]
    r = client.post("/v1/tables", files={"file": (name, body)})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_cost_table"


def test_empty_and_missing_file(client):  # type: ignore[no-untyped-def]
    r = client.post("/v1/tables", files={"file": ("x.csv", b"")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cost_table"
    r = client.post("/v1/tables", data={"name": "x"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_body_limit_is_413(client, settings):  # type: ignore[no-untyped-def]
    big = b"x" * (settings.max_body_bytes + 10)
    r = client.post("/v1/tables", files={"file": ("big.csv", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: counted while streaming
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\n'
        for _ in range(settings.max_body_bytes // 2**16 + 2):
            yield b"y" * 2**16

    r = client.post("/v1/tables", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_row_limit(app, client, table):  # type: ignore[no-untyped-def]
    app.state.settings = app.state.settings.model_copy(update={"max_table_rows": 5})
    r = client.post("/v1/tables", files={"file": ("t.parquet", table_to_parquet(table))})
    assert r.status_code == 413 and r.json()["error"]["code"] == "table_too_large"


def test_list_get_pagination(client):  # type: ignore[no-untyped-def]
    from allocator.core.synth import synth_table

    ids = [upload(client, synth_table(n_units=3, n_options=2, seed=s))["id"] for s in range(3)]
    page = client.get("/v1/tables", params={"limit": 2}).json()
    assert page["count"] == 3 and len(page["data"]) == 2
    rest = client.get("/v1/tables", params={"limit": 2, "offset": 2}).json()["data"]
    assert {t["id"] for t in page["data"] + rest} == set(ids)
    assert client.get(f"/v1/tables/{ids[0]}").json()["id"] == ids[0]
    assert client.get("/v1/tables", params={"limit": 0}).json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_download_round_trips(client, table, fmt):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    r = client.get(f"/v1/tables/{tid}/data", params={"format": fmt})
    assert r.status_code == 200
    if fmt == "parquet":
        back = table_from_parquet(r.content)
        assert back.metadata["model"] == table.metadata["model"]
    elif fmt == "csv":
        back = CostTable(pd.read_csv(io.BytesIO(r.content)))
    else:
        back = CostTable(pd.DataFrame.from_records(r.json()["rows"]))
    assert back.fingerprint == table.fingerprint


def test_delete_removes_table_and_its_plans(client, table):  # type: ignore[no-untyped-def]
    tid = upload(client, table)["id"]
    pid = client.post("/v1/plans", json={"table_id": tid, "budget": {"bpw": 4.0}}).json()["id"]
    assert client.delete(f"/v1/tables/{tid}").status_code == 204
    for path in (f"/v1/tables/{tid}", f"/v1/tables/{tid}/data"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "table_not_found"
    assert client.get(f"/v1/plans/{pid}").json()["error"]["code"] == "plan_not_found"
    assert client.delete(f"/v1/tables/{tid}").status_code == 404


def test_writes_need_the_token_reads_do_not_on_loopback(anon, client, table):  # type: ignore[no-untyped-def]
    body = {"file": ("t.parquet", table_to_parquet(table))}
    r = anon.post("/v1/tables", files=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = anon.post("/v1/tables", files=body, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})
    assert r.status_code == 401
    tid = upload(client, table)["id"]
    assert anon.get(f"/v1/tables/{tid}").status_code == 200
    assert anon.delete(f"/v1/tables/{tid}").status_code == 401
    r = anon.post("/v1/tables", files=body, headers={"X-Bitalloc-Token": AUTH["Authorization"][7:]})
    assert r.status_code == 200  # the alternative header works too (dedup → 200)
