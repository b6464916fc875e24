"""Route modules: thin handlers over the repository and the library."""

from __future__ import annotations

from typing import Any

from allocator.service.schemas import ErrorBody

__all__ = ["errors"]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: every listed status answers with :class:`ErrorBody`."""
    return {c: {"model": ErrorBody} for c in (*codes, 422, 500)}
