"""JSON text in and out with one error type per caller: every JSON a bitalloc file holds (tables,
sidecars, parquet metadata, plans) is parsed by :func:`parse_json` and written by :func:`dump_json`.
"""

from __future__ import annotations

import json
from typing import Any

from allocator.core.errors import AllocatorError

__all__ = ["dump_json", "parse_json"]


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
