"""Cost tables to and from files and bytes: the table-level API over the one file format of
:mod:`allocator.core.table_format` (parquet with the metadata in the schema, CSV + ``.meta.json``
sidecar, JSON, and parquet bytes for the service's blobs and the client's uploads).

Every reader ends in the format's metadata check and :class:`CostTable` validation; every writer
is atomic (:mod:`allocator.core.atomic`). Plans (``bitalloc.plan`` JSON) are read and written by
:class:`allocator.core.plan.BitPlan` through the same JSON helpers (:mod:`allocator.core.json_io`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allocator.core.json_io import dump_json, parse_json
from allocator.core.table import CostTable
from allocator.core.table_format import (
    frame_from_parquet_bytes,
    frame_to_parquet_bytes,
    read_table_file,
    sidecar_path,
    write_table_file,
)
from allocator.core.table_format import table_document as _frame_document

__all__ = ["dump_json", "load_table", "parse_json", "save_table", "sidecar_path", "table_document",
           "table_from_parquet_bytes", "table_to_parquet_bytes"]


def table_document(table: CostTable) -> dict[str, Any]:
    """The JSON cost-table document: format, version, metadata and one object per row."""
    return _frame_document(table.df, table.metadata)


def table_to_parquet_bytes(table: CostTable) -> bytes:
    """The bytes :func:`save_table` writes to a ``.parquet`` file."""
    return frame_to_parquet_bytes(table.df, table.metadata)


def table_from_parquet_bytes(blob: bytes, *, source: str = "parquet table") -> CostTable:
    """Decode parquet bytes with the same checks as :func:`load_table` (format, version, rules)."""
    return CostTable(*frame_from_parquet_bytes(blob, source=source))


def save_table(table: CostTable, path: Path) -> Path:
    """Write ``table`` to ``path`` (``.parquet``, ``.csv`` + sidecar, or ``.json``) atomically."""
    return write_table_file(table.df, table.metadata, path)


def load_table(path: Path) -> CostTable:
    """Read and validate a table written by :func:`save_table`."""
    return CostTable(*read_table_file(path))
