"""Cost tables: upload (parquet / CSV / JSON, validated like the library, deduplicated by
fingerprint), list, get, download and delete."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status

from allocator.core.errors import InvalidCostTableError
from allocator.core.table import CostTable
from allocator.service.api.routes import errors
from allocator.service.deps import DbDep, ReadAuth, SettingsDep, WriteAuth
from allocator.service.infra.errors import ServiceError
from allocator.service.parquet import ParquetTooLarge, check_parquet_size
from allocator.service.schemas import TablePublic, TablesPublic
from allocator.service.store import repo

router = APIRouter(prefix="/tables", tags=["tables"], responses=errors(401, 404))

TableFormat = Literal["parquet", "csv", "json"]
_MEDIA = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv", "json": "application/json"}


def _sniff(data: bytes, filename: str | None) -> TableFormat:
    suffix = Path(filename or "").suffix.lower().lstrip(".")
    if suffix in ("parquet", "csv", "json"):
        return suffix  # type: ignore[return-value]
    if data[:4] == b"PAR1":
        return "parquet"
    return "json" if data.lstrip()[:1] in (b"{", b"[") else "csv"


def parse_table(data: bytes, fmt: TableFormat, metadata: str | None) -> CostTable:
    """Validate with the library's own loader (same rules as ``CostTable.load``)."""
    from allocator.core.io import load_table

    meta = None
    if metadata:
        try:
            meta = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise ServiceError(422, "invalid_parameter", f"metadata is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise ServiceError(422, "invalid_parameter", "metadata must be a JSON object")
    with tempfile.TemporaryDirectory(prefix="bitalloc-upload-") as tmp:
        path = Path(tmp) / f"upload.{fmt}"
        path.write_bytes(data)
        if meta is not None and fmt == "csv":
            path.with_suffix(".meta.json").write_text(json.dumps(meta))
        try:
            table = load_table(path)
        except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
            # malformed documents reach pandas/pyarrow in shapes the loader does not expect
            raise InvalidCostTableError(f"cannot read the uploaded {fmt} table: {exc}") from None
    if meta is not None and fmt != "csv":
        table = CostTable(table.df, {**table.metadata, **meta})
    return table


@router.post("", response_model=TablePublic, status_code=status.HTTP_201_CREATED,
             dependencies=[WriteAuth], responses={200: {"model": TablePublic}, **errors(401, 413)})
def upload_table(
    db: DbDep, settings: SettingsDep, response: Response,
    file: Annotated[UploadFile, File(description="cost table: .parquet, .csv or .json")],
    format: Annotated[TableFormat | None, Form(description="overrides the file name's suffix")] = None,  # noqa: A002
    name: Annotated[str | None, Form(max_length=255)] = None,
    metadata: Annotated[str | None, Form(description="JSON object merged into the table metadata")] = None,
) -> TablePublic:
    """Store a cost table (201), or return the identical stored one (200, ``deduplicated``)."""
    data = file.file.read()
    if not data:
        raise ServiceError(422, "invalid_cost_table", "the uploaded file is empty")
    fmt = format or _sniff(data, file.filename)
    if fmt == "parquet":  # the footer says how big it decodes: refuse before decoding
        try:
            check_parquet_size(data, max_rows=settings.max_table_rows,
                               max_bytes=settings.max_table_bytes)
        except ParquetTooLarge as exc:
            raise ServiceError(413, "table_too_large", str(exc)) from None
    table = parse_table(data, fmt, metadata)
    if len(table) > settings.max_table_rows:
        raise ServiceError(413, "table_too_large",
                           f"table has {len(table)} rows; this server takes at most "
                           f"{settings.max_table_rows}")
    with db.write() as s:
        rec, created = repo.add_table(s, table=table, name=name or file.filename or "table")
    if not created:
        response.status_code = status.HTTP_200_OK
    db.cache.put(rec.id, table)
    return TablePublic.from_record(rec, deduplicated=not created)


@router.get("", response_model=TablesPublic, dependencies=[ReadAuth])
def list_tables(db: DbDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> TablesPublic:
    """Stored tables, newest first."""
    with db.read() as s:
        rows, count = repo.list_tables(s, limit=limit, offset=offset)
        return TablesPublic(data=[TablePublic.from_record(r) for r in rows], count=count)


@router.get("/{table_id}", response_model=TablePublic, dependencies=[ReadAuth])
def get_table(db: DbDep, table_id: str) -> TablePublic:
    with db.read() as s:
        return TablePublic.from_record(repo.get_table_record(s, table_id))


@router.get("/{table_id}/data", dependencies=[ReadAuth],
            responses={200: {"content": {m: {} for m in _MEDIA.values()}}})
def download_table(db: DbDep, table_id: str, format: TableFormat = "parquet") -> Response:  # noqa: A002
    """The table as a file (parquet keeps the metadata; CSV drops it; JSON embeds it)."""
    with db.read() as s:
        table = repo.load_table(s, table_id, db.cache)
    if format == "parquet":
        body = repo.table_to_parquet(table)
    elif format == "csv":
        body = table.df.to_csv(index=False).encode()
    else:
        from allocator.core.io import table_document

        body = json.dumps(table_document(table), default=str).encode()
    return Response(body, media_type=_MEDIA[format],
                    headers={"Content-Disposition": f'attachment; filename="{table_id}.{format}"'})


@router.delete("/{table_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAuth])
def delete_table(db: DbDep, table_id: str) -> Response:
    """Delete the table and every plan solved on it."""
    with db.write() as s:
        repo.delete_table(s, table_id, db.cache)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
