"""The cost-table file format: its name and version, the metadata check every reader ends in,
and the encodings of a table's (DataFrame, metadata) as parquet (metadata in the schema), CSV +
``.meta.json`` sidecar, JSON, and parquet bytes (the service's blobs and the client's uploads).

This module knows nothing of :class:`~allocator.core.table.CostTable`: a table is built from what
is read here and written through here, so ``CostTable.save`` / ``load`` use it without an import
cycle. Every reader ends in :func:`check_meta` (format name and a version this bitalloc reads);
every writer takes the metadata through :func:`~allocator.core.json_io.dump_json` and writes
through :func:`~allocator.core.atomic.atomic_path`. :mod:`allocator.core.io` is the table-level API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from allocator.core.atomic import atomic_path, atomic_write_text
from allocator.core.errors import InvalidCostTableError, InvalidParameterError
from allocator.core.json_io import dump_json, parse_json

__all__ = ["TABLE_FORMAT", "TABLE_VERSION", "check_meta", "frame_from_parquet_bytes",
           "frame_to_parquet_bytes", "read_table_file", "sidecar_path", "table_document",
           "write_table_file"]

TABLE_FORMAT = "bitalloc.cost_table"
TABLE_VERSION = 1
#: The parquet schema-metadata key the table metadata JSON is stored under.
_META_KEY = b"bitalloc"
_SUFFIXES = (".parquet", ".csv", ".json")


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".meta.json")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InvalidParameterError(
            f"cost table file {str(path)!r} has suffix {suffix!r}; use one of {list(_SUFFIXES)}"
        )
    return suffix


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _meta_json(meta: dict[str, Any]) -> str:
    return dump_json(meta, what="table metadata", error=InvalidCostTableError, sort_keys=True)


def _arrow(df: pd.DataFrame, meta: dict[str, Any]) -> Any:
    """The frame as an Arrow table with the metadata JSON under ``_META_KEY`` in its schema."""
    import pyarrow as pa

    arrow = pa.Table.from_pandas(df, preserve_index=False)
    return arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                          _META_KEY: _meta_json(meta)})


def table_document(df: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON cost-table document: format, version, metadata and one object per row."""
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "metadata": meta,
            "rows": df.to_dict(orient="records")}


def frame_to_parquet_bytes(df: pd.DataFrame, meta: dict[str, Any]) -> bytes:
    """The bytes :func:`write_table_file` writes to a ``.parquet`` file."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_arrow(df, meta), buf)
    return buf.getvalue()


def frame_from_parquet_bytes(blob: bytes, *, source: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Decode parquet bytes with the same checks as :func:`read_table_file` (format, version)."""
    import pyarrow as pa

    try:
        df, meta = _read_parquet(pa.BufferReader(blob), source)
    except (OSError, ValueError, pa.ArrowException) as exc:
        if isinstance(exc, InvalidCostTableError):
            raise
        raise InvalidCostTableError(f"cannot read {source}: {exc}") from None
    return df, check_meta(meta, Path(source))


def _read_parquet(where: Any, source: str) -> tuple[pd.DataFrame, Any]:
    import pyarrow.parquet as pq

    arrow = pq.read_table(where)
    raw = (arrow.schema.metadata or {}).get(_META_KEY)
    meta = parse_json(raw, source=f"metadata of {source}", error=InvalidCostTableError) if raw else {}
    return arrow.to_pandas(), meta


def write_table_file(df: pd.DataFrame, meta: dict[str, Any], path: Path) -> Path:
    """Write ``.parquet``, ``.csv`` (+ ``.meta.json`` sidecar) or ``.json``, each atomically."""
    suffix = _suffix(path)
    meta_text = _meta_json(meta)  # fails first, with the same message, whatever the format
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow = _arrow(df, meta)
        with atomic_path(path) as tmp:
            pq.write_table(arrow, tmp)
    elif suffix == ".csv":
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
        atomic_write_text(sidecar_path(path), meta_text)
    else:
        text = dump_json(table_document(df, meta), what="cost table", error=InvalidCostTableError)
        atomic_write_text(path, text)
    return path


def _version(value: Any, path: Path) -> int:
    """A whole number ≥ 1 (``1``, ``1.0`` and ``"1"`` all read as 1)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidCostTableError(
            f"{str(path)!r} has cost-table version {_short(value)}; expected a whole number "
            f"1..{TABLE_VERSION} (write the file with CostTable.save)"
        )
    return value


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The metadata of a file at ``path``, checked: a JSON object naming this format, with a
    version this bitalloc reads (normalized to an int)."""
    if not isinstance(meta, dict):
        raise InvalidCostTableError(
            f"{str(path)!r}: table metadata must be a JSON object, got {type(meta).__name__} "
            f"{_short(meta)}; write the file with CostTable.save"
        )
    fmt = meta.get("format", TABLE_FORMAT)
    if fmt != TABLE_FORMAT:
        raise InvalidCostTableError(
            f"{str(path)!r} is a {_short(fmt)} file, not a {TABLE_FORMAT!r}"
        )
    version = _version(meta.get("version", TABLE_VERSION), path)
    if version > TABLE_VERSION:
        raise InvalidCostTableError(
            f"{str(path)!r} has cost-table version {version}; this bitalloc reads up to "
            f"{TABLE_VERSION} — upgrade bitalloc"
        )
    return {**meta, "version": version}


def _read_json_document(path: Path) -> tuple[pd.DataFrame, Any]:
    doc = parse_json(path.read_bytes(), source=f"cost table {str(path)!r}", error=InvalidCostTableError)
    if not isinstance(doc, dict) or "rows" not in doc:
        raise InvalidCostTableError(f"{str(path)!r} is not a bitalloc cost-table JSON (no 'rows')")
    given = doc.get("metadata", {})
    if not isinstance(given, dict):
        raise InvalidCostTableError(f"{str(path)!r}: 'metadata' must be a JSON object, got {_short(given)}")
    rows = doc["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InvalidCostTableError(
            f"{str(path)!r}: 'rows' must be a list of objects (one per unit × option), got {_short(rows)}"
        )
    meta = {**given, "format": doc.get("format", TABLE_FORMAT), "version": doc.get("version", TABLE_VERSION)}
    return pd.DataFrame.from_records(rows), meta


def read_table_file(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The frame and checked metadata of a file written by :func:`write_table_file`."""
    suffix = _suffix(path)
    if not path.is_file():
        raise InvalidParameterError(f"cost table file {str(path)!r} does not exist")
    try:
        if suffix == ".parquet":
            df, meta = _read_parquet(path, repr(str(path)))
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype={"unit": str, "option": str, "tie": str}, keep_default_na=False,
                             na_values={"cost": ["nan", "NaN"], "cost_std": ["", "nan"]})
            side = sidecar_path(path)
            meta = parse_json(side.read_bytes(), source=f"sidecar {str(side)!r}",
                              error=InvalidCostTableError) if side.is_file() else {}
            check_meta(meta, side)
        else:
            df, meta = _read_json_document(path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InvalidCostTableError):
            raise
        raise InvalidCostTableError(f"cannot read cost table {str(path)!r}: {exc}") from None
    return df, check_meta(meta, path)
