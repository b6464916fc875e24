"""Cost-table files: parquet (metadata in the schema), CSV + ``.meta.json`` sidecar, JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from allocator.errors import InvalidCostTableError, InvalidParameterError
from allocator.table import _META_KEY, TABLE_FORMAT, TABLE_VERSION, CostTable

__all__ = ["load_table", "save_table", "sidecar_path"]

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


def save_table(table: CostTable, path: Path) -> Path:
    suffix = _suffix(path)
    meta = json.dumps(table.metadata, default=str, sort_keys=True)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(table.df, preserve_index=False)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _META_KEY: meta})
        _atomic_write(path, lambda p: pq.write_table(arrow, p))
    elif suffix == ".csv":
        _atomic_write(path, lambda p: table.df.to_csv(p, index=False))
        _atomic_write(sidecar_path(path), lambda p: p.write_text(meta))
    else:
        doc = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "metadata": table.metadata,
               "rows": table.df.to_dict(orient="records")}
        _atomic_write(path, lambda p: p.write_text(json.dumps(doc, default=str)))
    return path


def _check_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    fmt = meta.get("format", TABLE_FORMAT)
    if fmt != TABLE_FORMAT:
        raise InvalidCostTableError(f"{str(path)!r} is a {fmt!r} file, not a {TABLE_FORMAT!r}")
    version = int(meta.get("version", TABLE_VERSION))
    if version > TABLE_VERSION:
        raise InvalidCostTableError(
            f"{str(path)!r} has cost-table version {version}; this bitalloc reads up to "
            f"{TABLE_VERSION} — upgrade bitalloc"
        )
    return meta


def load_table(path: Path) -> CostTable:
    suffix = _suffix(path)
    if not path.is_file():
        raise InvalidParameterError(f"cost table file {str(path)!r} does not exist")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            arrow = pq.read_table(path)
            raw = (arrow.schema.metadata or {}).get(_META_KEY)
            meta = json.loads(raw) if raw else {}
            df = arrow.to_pandas()
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype={"unit": str, "option": str, "tie": str}, keep_default_na=False,
                             na_values={"cost": ["nan", "NaN"], "cost_std": ["", "nan"]})
            side = sidecar_path(path)
            meta = json.loads(side.read_text()) if side.is_file() else {}
        else:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or "rows" not in doc:
                raise InvalidCostTableError(f"{str(path)!r} is not a bitalloc cost-table JSON (no 'rows')")
            meta = {**doc.get("metadata", {}), "format": doc.get("format", TABLE_FORMAT),
                    "version": doc.get("version", TABLE_VERSION)}
            df = pd.DataFrame.from_records(doc["rows"])
    except (OSError, ValueError) as exc:
        if isinstance(exc, InvalidCostTableError):
            raise
        raise InvalidCostTableError(f"cannot read cost table {str(path)!r}: {exc}") from None
    return CostTable(df, _check_meta(meta, path))
