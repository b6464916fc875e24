"""The ``data`` parameter of the service's model jobs: the user's calibration text.

A client sends its text inline (``"data": ["text", ...]``) or names a ``.txt`` / ``.jsonl``
file on the server under a configured model root (``"data": "models/corpus/mine.jsonl"``),
with the same confinement as model paths (``..`` and symlinks out of a root are refused). Any
other server path is refused: a job must not read files the server was not told to share.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from allocator.service.infra.errors import ServiceError
from allocator.service.model_roots import resolve_model_path

__all__ = ["MAX_INLINE_CHARS", "MAX_INLINE_TEXTS", "refuse_nested_data", "service_data"]

MAX_INLINE_TEXTS = 100_000
MAX_INLINE_CHARS = 50_000_000


def _bad(message: str) -> ServiceError:
    return ServiceError(422, "invalid_parameter", message)


def service_data(value: Any, roots: list[Path]) -> list[str] | str | None:
    """``params.data`` checked: None, a list of texts, or the real path of a file under a root.

    Raises:
        ServiceError: 422 for a malformed value, 403 for a path outside the roots, 404 for a
            file that does not exist there.
    """
    if value is None:
        return None
    if isinstance(value, list):
        if not value or not all(isinstance(t, str) for t in value):
            raise _bad("params.data must be a non-empty list of texts or a file path under a "
                       "model root")
        if len(value) > MAX_INLINE_TEXTS or sum(len(t) for t in value) > MAX_INLINE_CHARS:
            raise _bad(f"params.data holds more than {MAX_INLINE_TEXTS:,} texts or "
                       f"{MAX_INLINE_CHARS:,} characters; put it in a file under a model root")
        if not any(t.strip() for t in value):
            raise _bad("params.data holds only empty texts; send at least one non-empty text")
        return list(value)
    if not isinstance(value, str):
        raise _bad("params.data must be a list of texts or a file path under a model root, got "
                   f"{type(value).__name__}")
    try:
        path = resolve_model_path(value, roots)
    except ServiceError as exc:  # same confinement as models, in the data's words
        code = "data_not_found" if exc.code == "model_not_found" else exc.code
        raise ServiceError(exc.status, code, f"params.data {value!r}: " + exc.message.replace(
            f"model {value!r} ", "").replace("params.model", "params.data")) from None
    if not path.is_file() or path.suffix.lower() not in (".txt", ".jsonl"):
        raise _bad(f"params.data {value!r} is not a .txt or .jsonl file")
    return str(path)


def refuse_nested_data(params: Mapping[str, Any]) -> None:
    """``params.params.data`` would reach the estimator unchecked: ask for ``params.data``."""
    inner = params.get("params")
    if isinstance(inner, Mapping) and "data" in inner:
        raise _bad("pass the calibration text as params.data (a list of texts or a file under a "
                   "model root), not inside params.params")
