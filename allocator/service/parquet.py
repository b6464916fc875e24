"""Cost tables as parquet bytes (the blob format of the store and of uploads/downloads).

Kept free of SQLAlchemy and FastAPI so :mod:`allocator.client` can use it alone.
"""

from __future__ import annotations

import io

from allocator.table import _META_KEY, CostTable

__all__ = ["table_from_parquet", "table_to_parquet"]


def table_to_parquet(table: CostTable) -> bytes:
    """The same bytes :meth:`CostTable.save` writes to a ``.parquet`` file."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table.df, preserve_index=False)
    meta = json.dumps(table.metadata, default=str, sort_keys=True)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _META_KEY: meta})
    buf = io.BytesIO()
    pq.write_table(arrow, buf)
    return buf.getvalue()


def table_from_parquet(blob: bytes) -> CostTable:
    import json

    import pyarrow.parquet as pq

    arrow = pq.read_table(io.BytesIO(blob))
    raw = (arrow.schema.metadata or {}).get(_META_KEY)
    return CostTable(arrow.to_pandas(), json.loads(raw) if raw else {})
