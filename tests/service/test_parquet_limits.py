"""Parquet uploads are sized from the footer before decoding, and every parquet blob the
service decodes passes the library's format/version check."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from allocator.core.errors import InvalidCostTableError
from allocator.core.table_format import _META_KEY
from allocator.service.parquet import (
    ParquetTooLarge,
    check_parquet_size,
    table_from_parquet,
    table_to_parquet,
)


def _arrow(rows: int, unit_len: int = 40) -> pa.Table:
    unit = pa.array(["u" * unit_len] * rows).dictionary_encode()
    return pa.table({"unit": unit, "params": pa.array([1] * rows, pa.int64()),
                     "option": pa.array(["int4"] * rows).dictionary_encode(),
                     "bits": pa.array([4.0] * rows), "size_bits": pa.array([4.0] * rows),
                     "cost": pa.array([0.0] * rows)})


def _compressible(rows: int, unit_len: int = 40) -> bytes:
    """A parquet blob that is tiny on the wire and large once decoded (dictionary + RLE)."""
    buf = io.BytesIO()
    pq.write_table(_arrow(rows, unit_len), buf, compression="zstd")
    return buf.getvalue()


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the upload is decoded in full."""
    import allocator.core.io

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the blob was decoded before its size was checked")

    monkeypatch.setattr(allocator.core.io, "load_table", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)


def test_row_count_comes_from_the_footer(app, client, no_decode):  # type: ignore[no-untyped-def]
    app.state.settings = app.state.settings.model_copy(update={"max_table_rows": 10_000})
    blob = _compressible(300_000)
    assert len(blob) < 64_000  # small on the wire: the body limit cannot catch it
    r = client.post("/v1/tables", files={"file": ("big.parquet", blob)})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "table_too_large" and "300000 rows" in err["message"]


def test_the_reported_12m_row_upload(client, no_decode):  # type: ignore[no-untyped-def]
    """The issue's case at the default limit (2M rows): 12M rows in a few hundred KB."""
    import resource

    one = _arrow(1_000_000)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, one.schema, compression="zstd") as writer:
        for _ in range(12):
            writer.write_table(one)
    blob = buf.getvalue()
    del one
    assert len(blob) < 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    r = client.post("/v1/tables", files={"file": ("big.parquet", blob)})
    assert r.status_code == 413 and "12000000 rows" in r.json()["error"]["message"], r.text
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 200, grown_mib


def test_decoded_bytes_are_bounded(app, client, no_decode):  # type: ignore[no-untyped-def]
    # 2,000 rows are within the row limit, but 5 KB unit names make them decode to ~10 MB
    app.state.settings = app.state.settings.model_copy(update={"max_table_bytes": 2**20})
    blob = _compressible(2_000, unit_len=5_000)
    assert len(blob) < 64_000
    r = client.post("/v1/tables", files={"file": ("wide.parquet", blob)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "table_too_large", r.text
    assert "BITALLOC_MAX_TABLE_BYTES" in r.json()["error"]["message"]


def test_check_measures_plain_size_without_materialising(table):  # type: ignore[no-untyped-def]
    blob = table_to_parquet(table)
    assert check_parquet_size(blob, max_rows=len(table), max_bytes=2**20) == len(table)
    with pytest.raises(ParquetTooLarge, match="rows"):
        check_parquet_size(blob, max_rows=len(table) - 1, max_bytes=2**20)
    big = _compressible(50_000, unit_len=1_000)  # 50 MB of strings once decoded
    before = pa.total_allocated_bytes()
    with pytest.raises(ParquetTooLarge, match="decodes to more than"):
        check_parquet_size(big, max_rows=10**6, max_bytes=10 * 2**20)
    assert pa.total_allocated_bytes() - before < 10 * 2**20
    with pytest.raises(InvalidCostTableError, match="cannot read"):
        check_parquet_size(b"PAR1 not really", max_rows=10, max_bytes=10)


def test_a_normal_upload_still_works(client, table):  # type: ignore[no-untyped-def]
    r = client.post("/v1/tables", files={"file": ("t.parquet", table_to_parquet(table))})
    assert r.status_code == 201 and r.json()["n_rows"] == len(table)


def _with_meta(table, **changes: object) -> bytes:  # type: ignore[no-untyped-def]
    arrow = pq.read_table(io.BytesIO(table_to_parquet(table)))
    meta = {**json.loads(arrow.schema.metadata[_META_KEY]), **changes}
    arrow = arrow.replace_schema_metadata({**arrow.schema.metadata, _META_KEY: json.dumps(meta)})
    buf = io.BytesIO()
    pq.write_table(arrow, buf)
    return buf.getvalue()


@pytest.mark.parametrize("changes, needle", [
    ({"version": 99}, "upgrade bitalloc"),
    ({"format": "bitalloc.plan"}, "not a 'bitalloc.cost_table'"),
])
def test_blobs_get_the_library_format_check(client, table, changes, needle):  # type: ignore[no-untyped-def]
    blob = _with_meta(table, **changes)
    with pytest.raises(InvalidCostTableError, match=needle):
        table_from_parquet(blob)  # what the store and Client.download_table decode with
    r = client.post("/v1/tables", files={"file": ("t.parquet", blob)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cost_table"
    assert table_from_parquet(table_to_parquet(table)).fingerprint == table.fingerprint
