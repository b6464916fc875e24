"""Cost-table serialization, all of it: parquet (metadata in the schema), CSV + ``.meta.json``
sidecar, JSON, and parquet bytes (the service's blobs and the client's uploads).

Every reader ends in :func:`_check_meta` (format name and a version this bitalloc reads) and
:class:`CostTable` validation; every writer takes the metadata through :func:`dump_json`. Plans
(``bitalloc.plan`` JSON) are read and written by :class:`allocator.core.plan.BitPlan` through
:func:`parse_json` / :func:`dump_json` / :func:`atomic_path` from here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from allocator.core.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from allocator.core.errors import AllocatorError, InvalidCostTableError, InvalidParameterError
from allocator.core.table import _META_KEY, TABLE_FORMAT, TABLE_VERSION, CostTable

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "dump_json", "load_table",
           "parse_json", "save_table", "sidecar_path", "table_document", "table_from_parquet_bytes",
           "table_to_parquet_bytes"]

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


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file + rename so a failed write never clobbers an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file 0600; a saved table or plan gets the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(data: str | bytes, *, source: str, error: type[AllocatorError]) -> Any:
    """``json.loads`` whose every failure is one ``error``: bad syntax, bytes that are not
    UTF-8/16/32 text, and nesting too deep for the parser (a ``RecursionError``)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{source} nests JSON too deeply to read; is it the right file?") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{source} is not JSON: {exc}") from None


def dump_json(doc: Any, *, what: str, error: type[AllocatorError], **kw: Any) -> str:
    """``json.dumps`` that refuses NaN/inf (``Infinity`` is not JSON) with one ``error``."""
    try:
        return json.dumps(doc, default=str, allow_nan=False, **kw)
    except ValueError:
        raise error(
            f"{what} holds a non-finite number (NaN or inf), which JSON cannot store; "
            "replace it with a finite value or null"
        ) from None
    except RecursionError:
        raise error(f"{what} nests too deeply to write as JSON") from None


def _meta_json(table: CostTable) -> str:
    return dump_json(table.metadata, what="table metadata", error=InvalidCostTableError,
                     sort_keys=True)


def _arrow(table: CostTable) -> Any:
    """The table as an Arrow table with the metadata JSON under ``_META_KEY`` in its schema."""
    import pyarrow as pa

    arrow = pa.Table.from_pandas(table.df, preserve_index=False)
    return arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                          _META_KEY: _meta_json(table)})


def table_document(table: CostTable) -> dict[str, Any]:
    """The JSON cost-table document: format, version, metadata and one object per row."""
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "metadata": table.metadata,
            "rows": table.df.to_dict(orient="records")}


def table_to_parquet_bytes(table: CostTable) -> bytes:
    """The bytes :func:`save_table` writes to a ``.parquet`` file."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_arrow(table), buf)
    return buf.getvalue()


def table_from_parquet_bytes(blob: bytes, *, source: str = "parquet table") -> CostTable:
    """Decode parquet bytes with the same checks as :func:`load_table` (format, version, rules)."""
    import pyarrow as pa

    try:
        df, meta = _read_parquet(pa.BufferReader(blob), source)
    except (OSError, ValueError, pa.ArrowException) as exc:
        if isinstance(exc, InvalidCostTableError):
            raise
        raise InvalidCostTableError(f"cannot read {source}: {exc}") from None
    return CostTable(df, _check_meta(meta, Path(source)))


def _read_parquet(where: Any, source: str) -> tuple[pd.DataFrame, Any]:
    import pyarrow.parquet as pq

    arrow = pq.read_table(where)
    raw = (arrow.schema.metadata or {}).get(_META_KEY)
    meta = parse_json(raw, source=f"metadata of {source}", error=InvalidCostTableError) if raw else {}
    return arrow.to_pandas(), meta


def save_table(table: CostTable, path: Path) -> Path:
    suffix = _suffix(path)
    meta = _meta_json(table)  # fails first, with the same message, whatever the format
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow = _arrow(table)
        _atomic_write(path, lambda p: pq.write_table(arrow, p))
    elif suffix == ".csv":
        _atomic_write(path, lambda p: table.df.to_csv(p, index=False))
        _atomic_write(sidecar_path(path), lambda p: p.write_text(meta))
    else:
        text = dump_json(table_document(table), what="cost table", error=InvalidCostTableError)
        _atomic_write(path, lambda p: p.write_text(text))
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


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
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


def load_table(path: Path) -> CostTable:
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
            _check_meta(meta, side)
        else:
            doc = parse_json(path.read_bytes(), source=f"cost table {str(path)!r}",
                             error=InvalidCostTableError)
            if not isinstance(doc, dict) or "rows" not in doc:
                raise InvalidCostTableError(f"{str(path)!r} is not a bitalloc cost-table JSON (no 'rows')")
            given = doc.get("metadata", {})
            if not isinstance(given, dict):
                raise InvalidCostTableError(
                    f"{str(path)!r}: 'metadata' must be a JSON object, got {_short(given)}"
                )
            rows = doc["rows"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise InvalidCostTableError(
                    f"{str(path)!r}: 'rows' must be a list of objects (one per unit × option), "
                    f"got {_short(rows)}"
                )
            meta = {**given, "format": doc.get("format", TABLE_FORMAT),
                    "version": doc.get("version", TABLE_VERSION)}
            df = pd.DataFrame.from_records(rows)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InvalidCostTableError):
            raise
        raise InvalidCostTableError(f"cannot read cost table {str(path)!r}: {exc}") from None
    return CostTable(df, _check_meta(meta, path))
