"""Cost tables as parquet bytes (the blob format of the store and of uploads/downloads).

Kept free of SQLAlchemy and FastAPI so :mod:`allocator.service.client` can use it alone. Encoding and
decoding are the library's own (:mod:`allocator.core.io`, the one home of table serialization), so a
blob gets the same checks as a file — format name, a version this bitalloc reads, the table
rules. :func:`check_parquet_size`
bounds what decoding an *untrusted* blob can cost before anything is decoded in full: parquet
compresses well enough that 276 KB can hold 12 million rows.
"""

from __future__ import annotations

import io
from typing import Any

from allocator.core.errors import InvalidCostTableError
from allocator.core.io import table_from_parquet_bytes, table_to_parquet_bytes
from allocator.core.table import CostTable

__all__ = ["ParquetTooLarge", "check_parquet_size", "table_from_parquet", "table_to_parquet"]

#: rows decoded at a time while measuring a blob: bounds the scan's own memory
_SCAN_ROWS = 4096


class ParquetTooLarge(InvalidCostTableError):
    """A parquet blob whose rows or decoded bytes exceed the limit (the service answers 413)."""


def table_to_parquet(table: CostTable) -> bytes:
    """The same bytes :meth:`CostTable.save` writes to a ``.parquet`` file."""
    return table_to_parquet_bytes(table)


def table_from_parquet(blob: bytes) -> CostTable:
    """Decode with the library's own reader (format/version check and table validation)."""
    return table_from_parquet_bytes(blob, source="the parquet table")


def _plain_bytes(column: Any) -> int:
    """Bytes ``column`` takes once decoded without dictionary encoding (what ``read_table``
    builds), computed from the dictionary without materialising it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        return sum(_plain_bytes(c) for c in column.chunks)
    if not pa.types.is_dictionary(column.type):
        return int(column.nbytes)
    lengths = pc.binary_length(column.dictionary).fill_null(0)
    values = pc.sum(pc.take(lengths, column.indices.fill_null(0))).as_py() or 0
    return int(values) + 8 * len(column)  # + offsets and validity, generously


def check_parquet_size(blob: bytes, *, max_rows: int, max_bytes: int) -> int:
    """The row count of an uploaded parquet blob, read from its footer; raises
    :class:`ParquetTooLarge` over ``max_rows`` rows, or when the data would decode to more than
    ``max_bytes`` bytes, before decoding it (the decode is measured in small batches with
    strings kept dictionary-encoded, so neither limit can be overrun by the check itself)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(blob)).metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidCostTableError(f"cannot read the uploaded parquet table: {exc}") from None
    rows = int(meta.num_rows)
    if rows > max_rows:
        raise ParquetTooLarge(f"table has {rows} rows; this server takes at most {max_rows} "
                              "(BITALLOC_MAX_TABLE_ROWS)")
    stored = sum(int(meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups))
    if stored > max_bytes:
        raise ParquetTooLarge(f"table holds {stored} bytes uncompressed; this server decodes at "
                              f"most {max_bytes} (BITALLOC_MAX_TABLE_BYTES)")
    try:
        schema = pq.ParquetFile(io.BytesIO(blob)).schema_arrow
        strings = [f.name for f in schema
                   if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                   or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        scan = pq.ParquetFile(io.BytesIO(blob), read_dictionary=strings)
        decoded = 0
        for batch in scan.iter_batches(batch_size=_SCAN_ROWS):
            decoded += sum(_plain_bytes(c) for c in batch.columns)
            if decoded > max_bytes:
                raise ParquetTooLarge(f"table decodes to more than {max_bytes} bytes; this "
                                      "server decodes at most that (BITALLOC_MAX_TABLE_BYTES)")
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, InvalidCostTableError):
            raise
        raise InvalidCostTableError(f"cannot read the uploaded parquet table: {exc}") from None
    return rows
